"""Every op whose launcher takes a run-time sm_scale declares it once, in its signature (default
None: the spec's), and binding a call fills it in by name: from the positional argument or the
keyword, checked, else the spec's. No kernel runs here: binding and filling only arrange the
arguments, so placeholders stand in for the tensors."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import dsagen
from dsagen.ops import own_ops

SPEC = dsagen.Spec(attention=dsagen.AttentionSpec(heads=5, qk_dim=80, v_dim=48, sm_scale=0.25))
SCALED_OPS = [op for op in own_ops() if "sm_scale" in op.signature.names]


def scale_position(op) -> int:
    return op.signature.names.index("sm_scale")


def placeholders(op) -> list:
    """One distinct stand-in per declared argument (none of them a scale)."""
    return [f"<{name}>" for name in op.signature.names]


def launched(op, args, kwargs) -> dict:
    """The arguments by name as the launcher gets them."""
    bound = op.signature.bind(op.name, tuple(args), kwargs)
    return op.signature.fill(SPEC, op.signature.inputs(bound))


def test_the_attention_ops_and_the_indexer_loss_take_a_scale():
    assert {"sparse_attention", "sparse_attention_bwd", "sparse_decode", "indexer_loss",
            "indexer_loss_bwd"} <= {op.name for op in SCALED_OPS}
    for op in SCALED_OPS:
        assert op.signature.python().parameters["sm_scale"].default is None, op.name


@pytest.mark.parametrize("op", SCALED_OPS, ids=lambda op: op.name)
@pytest.mark.parametrize("how", ["positional None", "left out", "positional", "keyword"])
def test_the_scale_is_filled_in_by_name(op, how):
    args, at = placeholders(op), scale_position(op)
    kwargs = {}
    if how == "positional None":
        args[at] = None
    elif how == "left out":
        kwargs = dict(zip(op.signature.names[at + 1:], args[at + 1:]))
        args = args[:at]
    elif how == "positional":
        args[at] = 0.5
    else:
        kwargs = dict(zip(op.signature.names[at + 1:], args[at + 1:]), sm_scale=0.5)
        args = args[:at]
    filled = launched(op, args, kwargs)
    want = 0.5 if how in ("positional", "keyword") else 0.25
    assert filled["sm_scale"] == want and type(filled["sm_scale"]) is float
    assert [v for k, v in filled.items() if k != "sm_scale"] == [p for i, p in enumerate(placeholders(op)) if i != at]
    assert list(filled) == list(op.signature.names)  # the launcher's order


@pytest.mark.parametrize("op", SCALED_OPS, ids=lambda op: op.name)
@pytest.mark.parametrize("value,message", [(-1, "must be a finite number > 0"),
                                           ("0.1", "must be a finite number > 0 (a float or int), got str")])
def test_a_bad_scale_is_refused_naming_it(op, value, message):
    args = placeholders(op)
    args[scale_position(op)] = value
    with pytest.raises(ValueError, match="^" + re.escape(f"sm_scale={value!r} {message}")):
        launched(op, args, {})


def test_a_numpy_scale_becomes_a_plain_float():
    np = pytest.importorskip("numpy")
    op = dsagen.ops.get_op("sparse_attention")
    filled = launched(op, ("q", "kv", "idx", np.float32(0.5)), {})
    assert list(filled.values()) == ["q", "kv", "idx", 0.5, None, None] and type(filled["sm_scale"]) is float


def test_a_call_that_does_not_fit_the_signature_names_the_kernel():
    op = dsagen.ops.get_op("topk")
    with pytest.raises(TypeError, match=r"^dsagen\.topk: .*'ke'.*\(signature: topk\(logits, ks, ke, \*, out=None\)\)"):
        op.signature.bind("topk", ("logits", "ks"), {})
    with pytest.raises(TypeError, match=r"^dsagen\.topk: .*'lse'"):
        op.signature.bind("topk", ("logits", "ks", "ke"), {"lse": None})


def test_no_op_module_takes_a_shared_constant_from_another():
    """Constants and helpers more than one op needs live in ops/shared.py, ops/checks.py and
    ops/workload.py, so op modules stay independent (a forward and its backward, or a workload and
    its op, still share their family's code)."""
    shared = {"WORKLOAD_NEXT_N", "INDEXER_TRAINS_THROUGH_LOSS", "INDEXER_LOGITS_TOLERANCES", "few_keys_warning",
              "mla_format", "softmax_scale", "SM_SCALE", "TORCH_DTYPES"}
    homes = {"base", "shared", "checks", "workload", "signature"}
    ops_dir = Path(dsagen.__file__).parent / "ops"
    for path in ops_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module not in (None, *homes):
                taken = {alias.name for alias in node.names} & shared
                assert not taken, f"{path.name} imports {sorted(taken)} from ops/{node.module}.py"
    for name in shared:
        assert sum(f"\n{name} = " in p.read_text() or f"\ndef {name}(" in p.read_text()
                   for p in ops_dir.glob("*.py")) == 1, name
