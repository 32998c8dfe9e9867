"""One kernel = one unit: the op registry, the one schedule resolver, the torch.library ops.

A kernel defined outside dsagen (tests/data/ops/masked_scale: an op module, its workload module,
its templates for both backends and its schedule files) goes through build, show, tune (CPU) and bench without any
edit of dsagen/; `show` prints what `build` runs; `torch.compile(fullgraph=True)` traces dsa() and
each kernel with no graph break.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dsagen
from dsagen.cli import app
from dsagen.ops import get_op, load_plugin, names
from dsagen.workloads import workload

ROOT = Path(__file__).resolve().parents[1]
V32 = ROOT / "specs" / "deepseek_v32.toml"
PLUGIN = ROOT / "tests" / "data" / "ops" / "masked_scale" / "masked_scale.py"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
runner = CliRunner()


def invoke(*args, env=None):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1", **(env or {})})
    result.plain = ANSI.sub("", result.output)
    return result


@pytest.fixture
def plugin(monkeypatch, tmp_path):
    """The test kernel, registered here and (DSAGEN_OPS) in every child process."""
    monkeypatch.setenv("DSAGEN_OPS", str(PLUGIN))
    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(tmp_path / "cache"))
    load_plugin(str(PLUGIN))
    yield get_op("masked_scale")
    dsagen.ops.unregister("masked_scale")


def small_spec():
    return dsagen.Spec(indexer=dsagen.IndexerSpec(heads=3, head_dim=40, dtype="bf16"), topk=dsagen.TopKSpec(k=9),
                       attention=dsagen.AttentionSpec(heads=5, qk_dim=80, v_dim=48))


# ------------------------------------------------------------------------------------------------
# the registry

def test_dsagens_own_kernels_are_registered_ops():
    assert {"indexer", "topk", "sparse_attention", "indexer_topk"} <= set(names())
    assert dsagen.ops.stages() == ("indexer", "topk", "sparse_attention")
    with pytest.raises(dsagen.DsagenError, match="unknown kernel 'nope': known kernels are indexer"):
        get_op("nope")


def test_an_op_name_must_be_an_identifier():
    class Bad(dsagen.ops.Op):
        name = "Bad-Name"

    with pytest.raises(dsagen.DsagenError, match="lower-case letters"):
        dsagen.ops.register(Bad())

    class Unplaced(dsagen.ops.Op):
        name = "unplaced"
        position = "first"

    with pytest.raises(dsagen.DsagenError, match="op 'unplaced': position='first' must be an integer"):
        dsagen.ops.register(Unplaced())


def test_every_module_of_the_ops_package_registers_without_a_list():
    """dsagen's own ops are the modules of dsagen/ops (found, not listed), each declaring its op; the
    helper modules and the workload modules declare none."""
    package = Path(dsagen.ops.__file__).parent
    modules = {p.stem for p in package.glob("*.py") if not p.stem.endswith("_workload")}
    modules -= {"__init__"} | dsagen.ops.HELPERS
    assert dsagen.ops._own_modules() == sorted(modules)
    own = dsagen.ops.own_ops()
    assert {type(op).__module__.rsplit(".", 1)[1] for op in own} == modules
    assert [op.name for op in own] == list(names())  # no plugin here: every op is dsagen's own


def test_listing_order_follows_the_declared_position_not_the_import_order():
    ops = dsagen.ops.all_ops()
    assert [op.position for op in ops] == sorted(op.position for op in ops)

    class Early(dsagen.ops.Op):  # registered last, listed between the indexer and the top-k
        name = "early_listed"
        position = dsagen.ops.get_op("indexer").position + 1

    dsagen.ops.register(Early())
    try:
        assert names()[:3] == ("indexer", "early_listed", "topk")
        assert dsagen.ops.stages() == ("indexer", "topk", "sparse_attention")
    finally:
        dsagen.ops.unregister("early_listed")
    assert "early_listed" not in names()


def test_the_kernel_option_help_lists_every_kernel_dsagen_ships():
    from dsagen.cli.options import KERNEL_HELP

    listed = KERNEL_HELP.split(": ", 1)[1].split(", or any kernel", 1)[0].split(", ")
    assert [item.split(" ")[0] for item in listed] == list(names())
    assert "indexer_topk (triton only)" in KERNEL_HELP


def test_tolerances_live_with_each_workload_and_verify_takes_numbers(gen):
    from dsagen.verify import Mismatch, assert_close, tolerance

    assert tolerance("indexer.logits.fp8_e4m3") == workload("indexer").tolerances["logits.fp8_e4m3"] == 1e-3
    assert tolerance("sparse_attention.lse") == workload("sparse_attention").tolerance("lse") == 1e-4
    ref = torch.randn(64, generator=gen, dtype=torch.float64)
    off = ref * (1 + 1e-3)  # RMS ratio 1e-3
    assert assert_close("anything", off, ref, 2e-3) == pytest.approx(1e-3)
    with pytest.raises(Mismatch, match="anything: RMS ratio .* > tolerance 0.0005"):
        assert_close("anything", off, ref, 5e-4)
    with pytest.raises(dsagen.DsagenError, match="op 'topk' declares no tolerance for 'out'"):
        assert_close("topk.out", off, ref)


def test_a_kernel_from_outside_dsagen_builds_and_runs_on_both_backends(plugin, gen, device):
    spec = dsagen.load_spec(V32)
    for backend in ("triton", "tvm") if device.type == "cpu" else ("triton",):  # its TVM kernel is llvm only
        kernels = dsagen.build(spec, backend=backend)
        assert "masked_scale" in kernels.kernels()
        recipe = workload(plugin)
        x, scale, ks, ke = recipe.inputs(spec, 7, 45, device, int(torch.randint(0, 1000, (1,), generator=gen)))
        out = torch.full_like(x, math.nan)
        assert kernels.masked_scale(x, scale, ks, ke, out=out) is out  # written in place
        assert torch.equal(out.cpu(), recipe.reference(spec, x, scale, ks, ke).float())  # one fp32 product: exact
        assert torch.equal(kernels.masked_scale(x, scale, ks, ke), out)  # through dsagen::masked_scale
        with pytest.raises(ValueError, match="scale must have dtype torch.float32"):
            kernels.masked_scale(x, scale.double(), ks, ke)


def test_a_kernel_from_outside_dsagen_goes_through_show_tune_and_bench(plugin, tmp_path):
    from dsagen.backends.triton import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())  # the CPU tuning runs the Triton interpreter
    shown = invoke("show", V32, "-k", "masked_scale", "--S", "8", "--SKV", "40")
    assert shown.exit_code == 0, shown.plain
    assert "def masked_scale(" in shown.stdout and "_masked_scale_kernel" in shown.stdout
    checked = invoke("check", V32, "--S", "8", "--SKV", "40")
    assert checked.exit_code == 0 and "[masked_scale]" in checked.plain

    db = tmp_path / "db" / "cpu-triton-interpreter.json"
    tuned = invoke("tune", V32, "-k", "masked_scale", "--S", "5", "--SKV", "40", "--device", "cpu", "-q",
                   "--trials", "1", "--db", db, "--storage", tmp_path / "study.journal")  # the default: recorded
    assert tuned.exit_code == 0, tuned.plain
    entries = json.loads(db.read_text())["entries"]
    assert [e["kernel"] for e in entries] == ["masked_scale"]

    benched = invoke("bench", V32, "-k", "masked_scale", "--S", "6", "--SKV", "50", "--backend", "tvm",
                     "--device", "cpu")
    assert benched.exit_code == 0, benched.plain
    assert re.search(r"^masked_scale\s+6\s+50\s", benched.plain, re.M), benched.plain


# ------------------------------------------------------------------------------------------------
# one resolver: show, generate, check and explain print what build runs

@pytest.mark.parametrize("S,SKV", [(4096, 32768), (1024, 8192), (300, 5000)], ids=lambda v: str(v))
def test_show_and_build_agree(S, SKV):
    spec = dsagen.load_spec(V32)
    kernels = dsagen.build(spec, gpu="nvidia-h200")
    for kernel in kernels.kernels():
        hit = kernels.resolve(kernel, S, SKV, "cuda")
        shown = invoke("show", V32, "-k", kernel, "--S", S, "--SKV", SKV, "--gpu", "nvidia-h200")
        assert shown.exit_code == 0, shown.plain
        assert shown.stdout == hit.generated.source, kernel
        shown_point = hit.point if hit.variant is None else {"variant": hit.variant, **hit.point}
        assert f"schedule {shown_point}, from {hit.source}" in shown.stderr
    explained = invoke("explain", V32, "--S", S, "--SKV", SKV, "--gpu", "nvidia-h200").plain
    for kernel in kernels.kernels():
        assert kernels.resolve(kernel, S, SKV, "cuda").module_name in explained


def test_generate_and_check_list_every_kernel_with_its_source(tmp_path):
    offered = [op.name for op in dsagen.ops.enabled(dsagen.load_spec(V32), "triton")]
    tuned = ("indexer", "topk", "sparse_attention", "indexer_topk")  # what the shipped H200 database holds here
    out = invoke("generate", V32, "-o", tmp_path, "--S", "4096", "--SKV", "32768", "--gpu", "nvidia-h200")
    assert out.exit_code == 0, out.plain
    for kernel in offered:
        tuned_here = r".*from tuned \(exact bucket S4096-SKV32768\)" if kernel in tuned else ""
        assert re.search(rf"^{kernel}: {tuned_here}", out.plain, re.M), out.plain
    checked = invoke("check", V32, "--S", "4096", "--SKV", "32768", "--gpu", "nvidia-h200").plain
    assert f"kernels (triton): {', '.join(offered)}" in checked
    for kernel in offered:
        assert f"[{kernel}]" in checked, kernel
    assert checked.count("from: tuned (exact bucket S4096-SKV32768)") == len(tuned)


def test_generate_for_the_tvm_cpu_uses_the_tuned_cpu_entries(tmp_path):
    from dsagen.gpus import cpu_type

    if cpu_type() != "cpu-x86-64":
        pytest.skip("the shipped CPU entries are for x86-64")
    out = invoke("generate", V32, "-o", tmp_path, "--backend", "tvm", "--device", "cpu", "--S", "256",
                 "--SKV", "4096")
    assert out.exit_code == 0, out.plain
    assert out.plain.count("tuned (exact bucket S256-SKV4096)") == 3, out.plain


# ------------------------------------------------------------------------------------------------
# PyTorch integration

def dsa_inputs(spec, gen, device, S=6, SKV=37):
    ix, at = spec.indexer, spec.attention
    q_idx = torch.randn(S, ix.heads, ix.head_dim, generator=gen).bfloat16()
    k_idx = torch.randn(SKV, ix.head_dim, generator=gen).bfloat16()
    ks = torch.zeros(S, dtype=torch.int32)
    ke = torch.arange(SKV - S + 1, SKV + 1, dtype=torch.int32)
    q = torch.randn(S, at.heads, at.qk_dim, generator=gen).bfloat16()
    kv = torch.randn(SKV, at.qk_dim, generator=gen).bfloat16()
    args = (q, kv, q_idx, k_idx, torch.rand(SKV, generator=gen) + 0.5, torch.randn(S, ix.heads, generator=gen), ks, ke)
    return tuple(a.to(device) for a in args)


def test_dsa_and_each_kernel_trace_with_no_graph_break(gen, device):
    import torch._dynamo

    kernels = dsagen.build(small_spec())
    args = dsa_inputs(kernels.spec, gen, device)
    eager = kernels.dsa(*args)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(kernels.dsa)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(kernels.dsa, fullgraph=True)(*args)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    q, kv, q_idx, k_idx, k_scale, w, ks, ke = args
    logits = kernels.indexer(q_idx, k_idx, k_scale, w, ks, ke)
    calls = {"indexer": (q_idx, k_idx, k_scale, w, ks, ke), "topk": (logits, ks, ke),
             "sparse_attention": (q, kv, eager.indices, 0.07), "indexer_topk": (q_idx, k_idx, k_scale, w, ks, ke)}
    for kernel, call in calls.items():
        torch._dynamo.reset()
        fn = getattr(kernels, kernel)
        assert torch._dynamo.explain(fn)(*call).graph_break_count == 0, kernel
        for a, b in zip(torch.utils._pytree.tree_leaves(fn(*call)),
                        torch.utils._pytree.tree_leaves(torch.compile(fn, fullgraph=True)(*call))):
            assert torch.equal(a, b), kernel


def test_an_input_that_requires_grad_is_refused_where_there_is_no_backward(gen, device):
    """A kernel without a backward op refuses an input that requires grad (its result would silently
    carry no gradient); under no_grad it runs. (Differentiable kernels: tests/test_autograd.py.)"""
    kernels = dsagen.build(small_spec())
    _, _, q_idx, k_idx, k_scale, w, ks, ke = dsa_inputs(kernels.spec, gen, device)
    with pytest.raises(RuntimeError, match="has no backward pass"):
        kernels.indexer(q_idx, k_idx, k_scale, w.requires_grad_(), ks, ke)
    with torch.no_grad():
        logits = kernels.indexer(q_idx, k_idx, k_scale, w, ks, ke)
    assert logits.grad_fn is None


@pytest.mark.parametrize("value,message", [
    (1e308, "outside the fp32 range"), (1e-300, "outside the fp32 range"), (math.inf, "finite number > 0"),
    (-0.5, "finite number > 0"), (True, "finite number > 0"), ("0.1", "finite number > 0"),
])
def test_sm_scale_outside_what_the_kernels_compute_in_is_refused(value, message, gen, device):
    kernels = dsagen.build(small_spec())
    q, kv, *_ = dsa_inputs(kernels.spec, gen, device)
    idx = torch.zeros(q.shape[0], 9, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=f"sm_scale=.*{re.escape(message)}"):
        kernels.sparse_attention(q, kv, idx, value)
    with pytest.raises(dsagen.SpecError, match=f"attention.sm_scale=.*{re.escape(message)}"):
        dsagen.Spec(attention=dsagen.AttentionSpec(heads=5, qk_dim=80, v_dim=48, sm_scale=value))


def test_a_numpy_scale_is_a_number(gen, device):
    import numpy as np

    spec = dsagen.Spec(indexer=small_spec().indexer, topk=small_spec().topk,
                       attention=dsagen.AttentionSpec(heads=5, qk_dim=80, v_dim=48, sm_scale=np.float32(0.1)))
    assert type(spec.attention.sm_scale) is float
    kernels = dsagen.build(small_spec())
    q, kv, *_ = dsa_inputs(kernels.spec, gen, device)
    idx = torch.randint(0, kv.shape[0], (q.shape[0], 9), generator=gen, dtype=torch.int32).to(device)
    a, _ = kernels.sparse_attention(q, kv, idx, np.float32(0.25))
    b, _ = kernels.sparse_attention(q, kv, idx, 0.25)
    assert torch.equal(a, b)


def test_the_run_time_scale_is_not_part_of_a_module():
    a = dsagen.build(small_spec()).resolve("sparse_attention", device_type="cpu").module_name
    other = dsagen.Spec(indexer=small_spec().indexer, topk=small_spec().topk,
                        attention=dsagen.AttentionSpec(heads=5, qk_dim=80, v_dim=48, sm_scale=0.3))
    assert dsagen.build(other).resolve("sparse_attention", device_type="cpu").module_name == a


def test_every_registered_kernel_reports_its_shape_for_the_bench_table():
    spec = dsagen.Spec(cache=dsagen.CacheSpec())
    for op in dsagen.ops.all_ops():
        info = workload(op).shape_info(spec, 4, 64)
        assert {"S", "SKV"} <= set(info), op.name
        assert len(workload(op).call_shape(4, 64)) == 2, op.name


# ------------------------------------------------------------------------------------------------
# kernel methods from the signatures; one execution path

def test_every_kernel_is_a_method_with_its_signature_and_docstring():
    import inspect

    kernels = dsagen.build(dsagen.Spec(cache=dsagen.CacheSpec()))
    for op in dsagen.ops.all_ops():
        method = getattr(kernels, op.name)
        assert inspect.signature(method) == op.signature.python(), op.name
        assert method.__doc__ and method.__doc__ == op.doc, op.name
        params = list(inspect.signature(method).parameters.values())
        assert [p.name for p in params] == [*op.signature.names, *op.signature.buffers], op.name
        assert all(p.kind is p.KEYWORD_ONLY for p in params[len(op.signature.names):]), op.name
    assert ("sm_scale=None, attn_sink=None, topk_length=None, *, out=None, lse=None, max_logits=None"
            in str(inspect.signature(kernels.sparse_attention)))


def test_output_buffers_go_through_the_mutating_torch_op(gen, device):
    """A call with buffers runs dsagen::<kernel>_out (traced with no graph break); its results are
    the buffers, and an extra output (max_logits) is written only where it is asked for."""
    import torch._dynamo

    kernels = dsagen.build(small_spec())
    q, kv, *_ = dsa_inputs(kernels.spec, gen, device)
    idx = torch.randint(-1, kv.shape[0], (q.shape[0], kernels.spec.topk.k), generator=gen, dtype=torch.int32)
    idx = idx.to(device)
    out, lse = kernels.sparse_attention(q, kv, idx, 0.07)

    def with_buffers(buffer, max_logits):
        return kernels.sparse_attention(q, kv, idx, 0.07, out=buffer, max_logits=max_logits)

    buffer, max_logits = torch.full_like(out, math.nan), torch.full_like(lse, math.nan)
    got_out, got_lse = with_buffers(buffer, max_logits)
    assert got_out is buffer and torch.equal(buffer, out) and torch.equal(got_lse, lse)
    assert torch.isfinite(max_logits).all() and (max_logits < lse + 1e-4).all()
    assert hasattr(torch.ops.dsagen, "sparse_attention_out")
    torch._dynamo.reset()
    assert torch._dynamo.explain(with_buffers)(torch.empty_like(out), torch.empty_like(lse)).graph_break_count == 0
    again, again_max = torch.full_like(out, math.nan), torch.full_like(lse, math.nan)
    compiled_out, compiled_lse = torch.compile(with_buffers, fullgraph=True)(again, again_max)
    assert torch.equal(again, out) and torch.equal(compiled_out, out) and torch.equal(compiled_lse, lse)
    assert torch.equal(again_max, max_logits)
