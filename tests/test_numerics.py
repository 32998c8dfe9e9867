"""Numerics the plain reference tests do not reach (docs/numerics.md): NaN semantics in every kernel of
both backends, large magnitudes in sparse attention, a warning-free top-k under the Triton
interpreter, and the two Triton renderings (GPU code free of interpreter work-arounds; the
interpreted module running on its own)."""
from __future__ import annotations

import difflib
import json
import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from dsagen.workloads import workload
import dsagen
from dsagen import reference
from dsagen.backends import triton as triton_backend
from dsagen.codegen import render
from dsagen.gpus import get_gpu
from dsagen.lower import kernel_context
from dsagen.schedule import choose
from dsagen.verify import assert_close, assert_topk


def small_spec(ix_dtype: str = "bf16", k: int = 7, heads: int = 3, qk_dim: int = 80, v_dim: int = 48) -> dsagen.Spec:
    return dsagen.Spec(
        indexer=dsagen.IndexerSpec(heads=3, head_dim=50, dtype=ix_dtype),
        topk=dsagen.TopKSpec(k=k),
        attention=dsagen.AttentionSpec(heads=heads, qk_dim=qk_dim, v_dim=v_dim),
    )


def quantize(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """On the host (in-kernel fp8 casts are wrong under the interpreter); NaN stays NaN in both."""
    if dtype == "fp8_e4m3":
        return x.clamp(-448, 448).to(torch.float8_e4m3fn)
    return x.to(torch.bfloat16)


def skip_without_interpreter(device) -> None:
    if device.type == "cpu" and (problem := triton_backend.interpreter_problem()):
        pytest.skip(problem)


def assert_nan_where_reference_then_close(what: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    """NaN exactly where the float64 reference has NaN (verify.assert_close lets no NaN pass), and
    every other entry within the tolerance of `what` (infinities exactly)."""
    got64 = got.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    nan_ref = torch.isnan(ref64)
    assert nan_ref.any() and not nan_ref.all(), "the test must put NaN in some entries and not in others"
    nan_got = torch.isnan(got64)
    if not torch.equal(nan_got, nan_ref):
        missing = (nan_ref & ~nan_got).nonzero()[:5].tolist()
        extra = (nan_got & ~nan_ref).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: NaN positions differ from the reference: missing at {missing}, extra at {extra}")
    assert_close(what, got64.masked_fill(nan_ref, 0.0), ref64.masked_fill(nan_ref, 0.0))


def assert_topk_nan_first(indices: torch.Tensor, logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int,
                          tolerance: float = 0.0) -> None:
    """The top-k contract with the NaN rule: NaN ranks above +inf (NaNs tie among themselves). Per
    row: min(k, window) distinct in-window indices, of which min(k, NaNs in the window) point at
    NaN and the others at the largest non-NaN values of the window (any tie order; tolerance as in
    verify.assert_topk), then -1 padding. The float64 reference's top-k values say the same."""
    idx = indices.detach().cpu().long()
    x = logits.detach().cpu()
    ks, ke = ks.cpu(), ke.cpu()
    assert tuple(idx.shape) == (x.shape[0], k)
    want = reference.topk_values(x, ks, ke, k)
    for t in range(x.shape[0]):
        lo, hi = reference.window(ks, ke, x.shape[1], t)
        window = x[t, lo:hi].double()
        n = min(k, hi - lo)
        head, tail = idx[t, :n], idx[t, n:]
        assert (tail == -1).all(), f"row {t}: slots past {n} must be -1"
        assert ((head >= lo) & (head < hi)).all(), f"row {t}: indices outside [{lo}, {hi})"
        assert torch.unique(head).numel() == n, f"row {t}: repeated indices"
        n_nan = min(n, int(torch.isnan(window).sum()))
        vals = x[t, head].double()
        assert int(torch.isnan(vals).sum()) == n_nan, f"row {t}: {int(torch.isnan(vals).sum())} NaN picked, want {n_nan}"
        got_rest = torch.sort(vals[~torch.isnan(vals)], descending=True).values
        want_rest = torch.sort(window[~torch.isnan(window)], descending=True).values[:n - n_nan]
        if tolerance == 0.0:
            assert torch.equal(got_rest, want_rest), f"row {t}: the non-NaN picks are not the largest"
        elif want_rest.numel():
            assert got_rest[-1] >= want_rest[-1] - tolerance * want_rest.abs().max(), f"row {t}: below tolerance"
        # the reference ranks the same way: its values are the NaNs, then the same non-NaN values
        ref_vals = want[t]
        assert int(torch.isnan(ref_vals).sum()) == n_nan and torch.equal(ref_vals[n_nan:], want_rest)


# ------------------------------------------------------------------------------------------------
# the two Triton renderings

VARIANTS = [
    ("indexer", None),
    ("indexer", {"block_m": 4, "block_h": 4, "block_n": 32}),
    ("topk", None),
    ("topk", {"sample": 0, "radix_bits": 2}),
    ("topk", {"row_reads": 2, "sample": 256, "candidates": 256}),
    ("topk", {"resident_max": 4096}),
    ("sparse_attention", None),
    ("sparse_attention", {"v_split": 2, "index_prefetch": 1}),
    ("indexer_topk", None),
    ("indexer_topk", {"block_m": 4, "block_h": 4, "block_n": 64, "sample": 128, "candidates": 256}),
]


def _render(spec: dsagen.Spec, kernel: str, interpret: bool, override=None):
    point = choose(spec, kernel, get_gpu("nvidia-h200"), "triton", override).point
    return render("triton", kernel_context(spec, kernel, point, "triton", interpret))


def _code(source: str) -> str:
    """The source without comment and blank lines (the header explains both renderings in words)."""
    return "\n".join(line for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#"))


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "bf16"])
@pytest.mark.parametrize("kernel,override", VARIANTS, ids=[f"{k}-{'default' if o is None else 'variant'}" for k, o in VARIANTS])
def test_gpu_rendering_has_no_interpreter_code(kernel, override, dtype):
    spec = small_spec(ix_dtype=dtype)
    gpu, interp = _render(spec, kernel, False, override), _render(spec, kernel, True, override)
    assert interp.module_name.endswith(f"_interp_{interp.key}") and "_interp" not in gpu.module_name
    gpu_code, interp_code = _code(gpu.source), _code(interp.source)
    for word in ("INTERPRET", "interpret", "_mma_operand"):
        assert word not in gpu_code, f"GPU rendering of {kernel} contains {word!r}"
    assert "_mma_operand" not in interp_code and "INTERPRET: tl.constexpr" not in interp_code
    # the renderings differ only in the interpreted module's import check and its fp32 dot operands
    guard = ("if not triton.knobs.runtime.interpret:", "raise ImportError(", '"before importing it')
    gpu_lines, interp_lines = gpu_code.splitlines(), interp_code.splitlines()
    casts = 0
    for tag, a0, a1, b0, b1 in difflib.SequenceMatcher(None, gpu_lines, interp_lines, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        for line in interp_lines[b0:b1]:
            assert ".to(tl.float32)" in line or any(g in line for g in guard), f"{kernel}: interpreted only: {line}"
            casts += ".to(tl.float32)" in line
        for line in gpu_lines[a0:a1]:
            assert ".to(tl.float32)" not in line and "bitcast" not in line, f"{kernel}: GPU only: {line}"
    assert sum(any(g in line for g in guard) for line in interp_lines) == 3
    assert (casts > 0) == (kernel != "topk")  # every kernel with tensor-core dots, and only those
    assert ("tl.uint8, bitcast=True" in interp_code) == (dtype == "fp8_e4m3" and kernel.startswith("indexer"))
    assert gpu.source.splitlines()[7].startswith("# Rendering: for CUDA GPUs")
    assert interp.source.splitlines()[7].startswith("# Rendering: for the Triton interpreter")
    for source in (gpu.source, interp.source):  # each module carries only helpers it calls
        for name in re.findall(r"^def (_\w+)\(", source, re.M):
            assert len(re.findall(rf"\b{name}\b", source)) > 1, f"{kernel}: {name} is defined but never called"
    # and the GPU rendering still hands every kernel to the ahead-of-time compiler
    module = triton_backend.load(triton_backend.materialize(gpu), interpret=False)
    launches = module.compile_signature()
    assert launches and all("INTERPRET" not in constexprs for _, _, constexprs, _ in launches)


RUN_ALONE = r"""
import importlib.util, json, sys
import torch
folder, names = sys.argv[1], json.loads(sys.argv[2])
modules = {}
for kernel, file in names.items():
    spec = importlib.util.spec_from_file_location(f"vendored_{kernel}", f"{folder}/{file}")
    modules[kernel] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modules[kernel])
assert not [m for m in sys.modules if m.split(".")[0] in ("dsagen", "cli")], "imports dsagen"
calls = torch.load(f"{folder}/inputs.pt")
out = {kernel: getattr(modules[kernel], kernel)(*args, **outs) for kernel, (args, outs) in calls.items()}
torch.save(out, f"{folder}/outputs.pt")
print("ok")
"""

IMPORT_WITHOUT_INTERPRET = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("vendored", sys.argv[1])
try:
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
except ImportError as exc:
    print("refused:", exc)
else:
    print("imported")
"""


def test_interpreted_modules_run_alone_on_cpu(tmp_path, child_env, gen):
    """Each interpreted rendering of every kernel a Triton build offers, written out and run in a
    fresh Python with TRITON_INTERPRET=1 and no dsagen on the op's own workload (CPU tensors in,
    poisoned outputs): its check against the float64 reference passes on every row. Without
    TRITON_INTERPRET the module says what to do at import instead of Triton's "0 active drivers"
    at the first launch."""
    if problem := triton_backend.interpreter_problem():
        pytest.skip(problem)
    spec = small_spec(ix_dtype="fp8_e4m3")
    S, SKV, seed = 5, 37, int(torch.randint(0, 10_000, (1,), generator=gen))
    names, calls = {}, {}
    for op in dsagen.ops.enabled(spec, "triton"):
        generated = _render(spec, op.name, True)
        names[op.name] = f"{generated.module_name}.py"
        (tmp_path / names[op.name]).write_text(generated.source)
        inputs = workload(op).inputs(spec, S, SKV, "cpu", seed)
        calls[op.name] = (inputs, workload(op).poisoned_outputs(spec, inputs))
    assert {"indexer", "topk", "sparse_attention", "indexer_topk"} <= set(names)
    torch.save(calls, tmp_path / "inputs.pt")
    env = {**child_env, "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    bare_env = {key: value for key, value in env.items() if key != "TRITON_INTERPRET"}
    runs = [subprocess.Popen([sys.executable, "-c", RUN_ALONE, str(tmp_path), json.dumps(names)], env=env,
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
            subprocess.Popen([sys.executable, "-c", IMPORT_WITHOUT_INTERPRET, str(tmp_path / names["topk"])],
                             env=bare_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    (ran, _), (bare, _) = (proc.communicate(timeout=300) for proc in runs)
    assert runs[0].returncode == 0 and ran.strip().endswith("ok"), ran
    assert runs[1].returncode == 0 and "refused:" in bare and "TRITON_INTERPRET=1" in bare, bare
    got = torch.load(tmp_path / "outputs.pt")
    for kernel, (inputs, _) in calls.items():
        workload(kernel).check(spec, inputs, got[kernel], torch.arange(S))


# ------------------------------------------------------------------------------------------------
# top-k under the interpreter: no numpy warnings

def awkward_logits(gen, S: int, SKV: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of everything the uint32 image of a float meets: NaN of both signs and several payloads,
    +-inf, +-0, subnormals, heavy ties, all-NaN; windows that are full, short (taken whole), empty,
    inverted and out of range."""
    x = torch.randn(S, SKV, generator=gen)
    x[1] = x[1].round()  # ties
    x[2, 5:40] = math.inf
    x[3, ::3] = -math.inf
    x[4, ::97] = math.nan  # fewer NaN than k: all of them, then the largest of the rest
    x[4, 1::131] = -math.nan  # sign bit set: the default NaN of x86
    x[4].view(torch.int32)[2::211] = 0x7F800001  # a signalling-NaN payload
    x[4, 3::173] = math.inf
    x[5] = 0.0
    x[5, ::2] = -0.0
    x[6] = torch.randn(SKV, generator=gen) * 1e-40  # subnormals
    x[7] = math.nan
    x[8, 3] = math.nan
    ks = torch.zeros(S, dtype=torch.int32)
    ke = torch.full((S,), SKV, dtype=torch.int32)
    ks[9], ke[9] = 2, 6  # shorter than k: the whole window
    ks[10], ke[10] = 7, 3  # inverted: empty
    ks[0], ke[0] = -5, SKV + 9  # clamped to [0, SKV)
    ks[8], ke[8] = 1, SKV - 1
    return x, ks, ke


TOPK_SCHEDULES = [
    {"sample": 0, "radix_bits": 2, "block_n": 256},
    {"sample": 0, "radix_bits": 4, "block_n": 256},
    {"sample": 128, "candidates": 256, "block_n": 256, "row_reads": 1},
    {"sample": 256, "candidates": 256, "block_n": 256, "row_reads": 2},
    {"resident_max": 4096},
    {},
]


@pytest.mark.parametrize("schedule", TOPK_SCHEDULES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()) or "default")
def test_triton_topk_under_the_interpreter_is_warning_free(gen, schedule):
    """NumPy's RuntimeWarnings (overflow, invalid value in a cast or shift) are errors here: the
    interpreted top-k must not produce any, on any path, and still be exact (NaN first)."""
    if problem := triton_backend.interpreter_problem():
        pytest.skip(problem)
    k = 37
    kernels = dsagen.build(small_spec(k=k), schedules={"topk": schedule} if schedule else None)
    x, ks, ke = awkward_logits(gen, 11, 1001)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error", RuntimeWarning)
        got = kernels.topk(x, ks, ke, out=torch.full((11, k), -7, dtype=torch.int32))
    assert_topk_nan_first(got, x, ks, ke, k)


@pytest.mark.parametrize("schedule", [None, {"block_m": 4, "block_h": 4, "block_n": 64, "sample": 128, "candidates": 256}],
                         ids=["per-row", "rows4"])
def test_triton_fused_indexer_topk_under_the_interpreter_is_warning_free_and_nan_first(gen, schedule):
    """The fused selection, NaN keys included (whole key columns: a NaN in k or k_scale), without
    numpy warnings."""
    if problem := triton_backend.interpreter_problem():
        pytest.skip(problem)
    k, S, SKV = 7, 6, 150
    kernels = dsagen.build(small_spec(k=k), schedules={"indexer_topk": schedule} if schedule else None)
    q = torch.randint(-3, 4, (S, 3, 50), generator=gen).bfloat16()
    kk = torch.randint(-3, 4, (SKV, 50), generator=gen).float()
    kk[[3, 77, 140], 5] = math.nan
    kk = kk.bfloat16()
    w = torch.randn(S, 3, generator=gen)
    k_scale = torch.rand(SKV, generator=gen) + 0.5
    k_scale[[10, 11, 12, 13, 14, 15, 16, 17, 90]] = math.nan
    ks = torch.tensor([0, 0, 20, 0, 100, 5], dtype=torch.int32)
    ke = torch.tensor([150, 80, 150, 9, 150, 9], dtype=torch.int32)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error", RuntimeWarning)
        got = kernels.indexer_topk(q, kk, k_scale, w, ks, ke)
    ref = reference.indexer(q, kk, k_scale, w, ks, ke)
    assert_topk_nan_first(got, ref.float(), ks, ke, k, tolerance=1e-3)


# ------------------------------------------------------------------------------------------------
# NaN semantics, both backends (docs/numerics.md)

@pytest.mark.parametrize("dtype", ["bf16", "fp8_e4m3"])
def test_indexer_nan_makes_the_affected_logits_nan(device, backend, gen, dtype):
    """A NaN in q[t, j] (any head) or w[t, j] makes row t's logits NaN, a NaN in k[s] or k_scale[s]
    makes column s NaN, inside the windows only (outside stays -inf); relu keeps NaN."""
    if backend == "triton":
        skip_without_interpreter(device)
    kernels = dsagen.build(small_spec(ix_dtype=dtype), backend=backend)
    S, SKV = 7, 45
    qf, kf = torch.randn(S, 3, 50, generator=gen) * 2, torch.randn(SKV, 50, generator=gen) * 2
    qf[1, 2, 7] = math.nan  # one value of one head
    qf[6, 0, 49] = math.nan
    kf[10, 3] = math.nan
    kf[44, 0] = math.nan  # the last key: only in full windows
    w = torch.randn(S, 3, generator=gen)
    w[3, 1] = math.nan
    k_scale = torch.rand(SKV, generator=gen) + 0.5
    k_scale[20] = math.nan
    q, k = quantize(qf, dtype), quantize(kf, dtype)
    ks = torch.tensor([0, 0, 5, 0, 30, 11, 44], dtype=torch.int32)
    ke = torch.tensor([45, 20, 15, 45, 45, 11, 45], dtype=torch.int32)
    args = [t.to(device) for t in (q, k, k_scale, w, ks, ke)]
    got = kernels.indexer(*args, out=torch.full((S, SKV), 7.0, device=device))
    ref = reference.indexer(q, k, k_scale, w, ks, ke)
    assert torch.isnan(ref[1, 0:20]).all() and torch.isnan(ref[[0, 3], 20]).all() and torch.isnan(ref[4]).nonzero().flatten().tolist() == [44]
    assert_nan_where_reference_then_close(f"indexer.logits.{dtype}", got, ref)


TOPK_NAN_SCHEDULES = [None, {"sample": 0, "radix_bits": 4, "block_n": 256}, {"resident_max": 4096}]


@pytest.mark.parametrize("schedule", TOPK_NAN_SCHEDULES, ids=["default", "radix", "resident"])
def test_topk_nan_ranks_above_inf(device, backend, gen, schedule):
    """NaN (any sign or payload) ranks above +inf and NaNs tie: they are selected first, as by
    torch.topk; the rest is the exact top-k of the non-NaN values."""
    if backend == "triton":
        skip_without_interpreter(device)
    elif schedule is not None:
        pytest.skip("the schedule variants are Triton's")
    k = 37
    kernels = dsagen.build(small_spec(k=k), backend=backend, schedules={"topk": schedule} if schedule else None)
    x, ks, ke = awkward_logits(gen, 11, 901)
    got = kernels.topk(x.to(device), ks.to(device), ke.to(device),
                       out=torch.full((11, k), -7, dtype=torch.int32, device=device))
    assert_topk_nan_first(got, x, ks, ke, k)


def test_reference_topk_ranks_nan_like_torch_topk(gen):
    """The rule is torch.topk's: the reference's values equal torch.topk's, NaN first."""
    x, ks, ke = awkward_logits(gen, 11, 300)
    for t, values in enumerate(reference.topk_values(x, ks, ke, 37)):
        lo, hi = reference.window(ks, ke, x.shape[1], t)
        want = torch.topk(x[t, lo:hi].double(), min(37, hi - lo)).values
        assert torch.equal(torch.isnan(values), torch.isnan(want))
        assert torch.equal(values[~torch.isnan(values)], want[~torch.isnan(want)])


def test_sparse_attention_nan_makes_the_affected_rows_nan(device, backend, gen):
    """A NaN in q[t, h] makes out[t, h] and lse[t, h] NaN; a NaN anywhere in a selected kv row (V
    part or rope part) makes every head of the tokens that select it NaN; an unselected NaN row
    changes nothing, and a token with no valid index still gives out = 0 and lse = +inf."""
    if backend == "triton":
        skip_without_interpreter(device)
    kernels = dsagen.build(small_spec(k=9, heads=5, qk_dim=80, v_dim=48), backend=backend)
    S, SKV = 7, 41
    q = torch.randn(S, 5, 80, generator=gen).bfloat16()
    kv = torch.randn(SKV, 80, generator=gen).bfloat16()
    q[0, 1, 5] = math.nan  # latent part of one head
    q[5, 4, 70] = math.nan  # rope part of the last head
    kv[11, 30] = math.nan  # V part
    kv[12, 66] = math.nan  # rope part only
    kv[40, 0] = math.nan  # never selected
    idx = torch.stack([torch.randperm(SKV - 1, generator=gen)[:9] for _ in range(S)]).int()
    idx[idx == 11], idx[idx == 12] = 13, 14
    idx[2, 4] = 11
    idx[3, 8] = 12
    idx[4] = torch.tensor([-1, 41, -(2**31), 2**31 - 1, -1, 45, -7, 41, 100])  # no valid index
    idx[1, 0] = 40 + SKV  # invalid, not row 40
    out, lse = kernels.sparse_attention(q.to(device), kv.to(device), idx.to(device), 0.125,
                                        out=torch.full((S, 5, 48), 3.0, dtype=torch.bfloat16, device=device),
                                        lse=torch.full((S, 5), 3.0, device=device))
    ref_out, ref_lse = reference.sparse_attention(q, kv, idx, 0.125, 48)
    assert torch.isnan(ref_lse[2]).all() and torch.isnan(ref_lse[3]).all() and torch.isnan(ref_lse[0, 1])
    assert_nan_where_reference_then_close("sparse_attention.out", out, ref_out)
    assert_nan_where_reference_then_close("sparse_attention.lse", lse, ref_lse)
    assert torch.all(out[4].cpu() == 0) and torch.all(torch.isposinf(lse[4].cpu()))


# ------------------------------------------------------------------------------------------------
# large magnitudes

@pytest.mark.parametrize("which", ["kv", "q", "both"])
@pytest.mark.parametrize("magnitude", [1e10, 1e-10])
def test_sparse_attention_large_and_small_magnitudes(device, backend, gen, which, magnitude):
    """Scores near 1e11 (kv or q scaled by 1e10) or 1e20 (both) leave fp32 room but make every
    rounding step 2^10 or more wide; scores near 0 make the softmax flat. Both backends must match
    the float64 reference."""
    if backend == "triton":
        skip_without_interpreter(device)
    kernels = dsagen.build(small_spec(k=13, heads=5, qk_dim=80, v_dim=48), backend=backend)
    S, SKV = 9, 67
    q = torch.randn(S, 5, 80, generator=gen)
    kv = torch.randn(SKV, 80, generator=gen)
    if which in ("q", "both"):
        q = q * magnitude
    if which in ("kv", "both"):
        kv = kv * magnitude
    q, kv = q.bfloat16(), kv.bfloat16()
    idx = torch.randint(-3, SKV + 3, (S, 13), generator=gen, dtype=torch.int32)
    idx[0] = -1
    out = torch.full((S, 5, 48), math.nan, dtype=torch.bfloat16, device=device)
    lse = torch.full((S, 5), math.nan, device=device)
    kernels.sparse_attention(q.to(device), kv.to(device), idx.to(device), 0.0721, out=out, lse=lse)
    ref_out, ref_lse = reference.sparse_attention(q, kv, idx, 0.0721, 48)
    assert_close("sparse_attention.out", out, ref_out)
    assert_close("sparse_attention.lse", lse, ref_lse)


def test_the_shared_top_k_check_follows_the_nan_rule():
    """dsagen.verify.assert_topk (used by the tuner and bench) ranks NaN above +inf too."""
    from dsagen.verify import Mismatch, assert_topk

    x = torch.tensor([[1.0, math.nan, 3.0, -math.inf, math.inf, 2.0]])
    ks, ke = torch.tensor([0], dtype=torch.int32), torch.tensor([6], dtype=torch.int32)
    assert_topk(torch.tensor([[4, 1, 2]], dtype=torch.int32), x, ks, ke, 3)  # NaN, +inf, 3 in any order
    with pytest.raises(Mismatch, match="0 NaN selected"):
        assert_topk(torch.tensor([[4, 2, 5]], dtype=torch.int32), x, ks, ke, 3)
    with pytest.raises(Mismatch, match="not the 3 largest"):
        assert_topk(torch.tensor([[1, 4, 5]], dtype=torch.int32), x, ks, ke, 3)
