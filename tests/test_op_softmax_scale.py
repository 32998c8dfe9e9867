"""Every op whose launcher takes a run-time sm_scale fills it in one way: at the position its `args`
declare, from the positional argument or the keyword, checked, else the spec's. No kernel runs
here: launch_args only arranges the arguments, so placeholders stand in for the tensors."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import dsagen
from dsagen.ops import own_ops
from dsagen.ops.base import with_softmax_scale

SPEC = dsagen.Spec(attention=dsagen.AttentionSpec(heads=5, qk_dim=80, v_dim=48, sm_scale=0.25))
SCALED_OPS = [op for op in own_ops() if ("sm_scale", "float") in op.args]


def scale_position(op) -> int:
    return [name for name, _ in op.args].index("sm_scale")


def placeholders(op) -> list:
    """One distinct stand-in per declared argument (none of them a scale)."""
    return [f"<{name}>" for name, _ in op.args]


def test_the_attention_ops_and_the_indexer_loss_take_a_scale():
    assert {"sparse_attention", "sparse_attention_bwd", "sparse_decode", "indexer_loss",
            "indexer_loss_bwd"} <= {op.name for op in SCALED_OPS}


@pytest.mark.parametrize("op", SCALED_OPS, ids=lambda op: op.name)
@pytest.mark.parametrize("how", ["positional None", "left out", "positional", "keyword"])
def test_the_scale_lands_at_its_declared_position(op, how):
    args, at = placeholders(op), scale_position(op)
    kwargs = {"out": None}
    if how == "positional None":
        args[at] = None
    elif how == "left out":
        args = args[:at]
    elif how == "positional":
        args[at] = 0.5
    else:
        del args[at:]
        kwargs["sm_scale"] = 0.5
    filled, rest = op.launch_args(SPEC, tuple(args), kwargs)
    want = 0.5 if how in ("positional", "keyword") else 0.25
    assert filled[at] == want and type(filled[at]) is float
    assert filled[:at] == tuple(placeholders(op)[:at])
    if how != "keyword":
        assert filled[at + 1:] == tuple(args[at + 1:])
    assert rest == {"out": None}


@pytest.mark.parametrize("op", SCALED_OPS, ids=lambda op: op.name)
@pytest.mark.parametrize("value,message", [(-1, "must be a finite number > 0"),
                                           ("0.1", "must be a finite number > 0 (a float or int), got str")])
def test_a_bad_scale_is_refused_naming_it(op, value, message):
    args = placeholders(op)
    args[scale_position(op)] = value
    with pytest.raises(ValueError, match="^" + re.escape(f"sm_scale={value!r} {message}")):
        op.launch_args(SPEC, tuple(args), {})


def test_a_numpy_scale_becomes_a_plain_float():
    np = pytest.importorskip("numpy")
    filled, _ = with_softmax_scale(SPEC, ("q", "kv", "idx", np.float32(0.5)), {})
    assert filled == ("q", "kv", "idx", 0.5) and type(filled[3]) is float


def test_no_op_module_takes_a_shared_constant_from_another():
    """Constants and helpers every op may need live in ops/base.py, so op modules stay independent
    (a forward and its backward still share their family's code)."""
    shared = {"WORKLOAD_NEXT_N", "INDEXER_TRAINS_THROUGH_LOSS", "INDEXER_LOGITS_TOLERANCES", "few_keys_warning",
              "mla_format", "with_softmax_scale", "softmax_scale"}
    ops_dir = Path(dsagen.__file__).parent / "ops"
    for path in ops_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module not in (None, "base"):
                taken = {alias.name for alias in node.names} & shared
                assert not taken, f"{path.name} imports {sorted(taken)} from ops/{node.module}.py"
    for name in shared:
        assert sum(f"\n{name} = " in p.read_text() or f"\ndef {name}(" in p.read_text()
                   for p in ops_dir.glob("*.py")) == 1, name
