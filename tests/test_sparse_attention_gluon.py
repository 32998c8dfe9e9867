"""The Gluon (warp-specialized, sm_90) sparse MLA attention forward: the variants `gluon` and
`gluon_split` of sparse_attention.

On any machine: the Gluon variants compile for sm_90 from a GluonASTSource (wgmma, cp.async,
mbarriers and register reallocation in the PTX), the interpreter runs the tl variant instead, and
a Gluon variant is refused where the kernel does not apply. On an sm_90 GPU (skipped elsewhere): the
Gluon kernel against dsagen's float64 reference at odd shapes, with poisoned outputs, every kind
of invalid index, an all-invalid row, NaN inputs and the optional max_logits output.
"""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from dsagen.ops import get_op
import dsagen
from dsagen import reference
from dsagen.backends import triton as triton_backend
from dsagen.errors import ScheduleError
from dsagen.gpus import get_gpu
from dsagen.kernels import resolve_kernel
from dsagen.verify import assert_close

V32 = dsagen.load_spec("specs/deepseek_v32.toml")
GLUON = {"variant": "gluon"}
NUMBER = {"gluon": 1, "gluon_split": 2}  # the module constant GLUON of each variant


def attention_spec(heads: int = 128, k: int = 2048, qk_dim: int = 576, v_dim: int = 512) -> dsagen.Spec:
    return dsagen.Spec(topk=dsagen.TopKSpec(k=k),
                       attention=dataclasses.replace(V32.attention, heads=heads, qk_dim=qk_dim, v_dim=v_dim))


# ------------------------------------------------------------------------------------------------
# any machine: rendering, legality, the sm_90 compile

COMPILE_CASES = [
    (128, {"variant": "gluon"}),
    (128, {"variant": "gluon_split"}),
    (128, {"variant": "gluon_split", "block_n": 32, "num_stages": 4}),
    (40, {"variant": "gluon_split", "block_n": 32, "num_stages": 2}),
    (128, {"variant": "gluon", "block_n": 32, "num_stages": 3}),
    (64, {"variant": "gluon"}),
    (40, {"variant": "gluon", "block_n": 32, "num_stages": 2}),
]


@pytest.mark.parametrize("heads,schedule", COMPILE_CASES,
                         ids=[f"H{h}-{s['variant']}-n{s.get('block_n', 64)}-s{s.get('num_stages', 2)}" for h, s in COMPILE_CASES])
def test_gluon_compiles_for_sm90(heads, schedule):
    from triton.experimental.gluon._runtime import GluonJITFunction

    src = resolve_kernel(attention_spec(heads), "sparse_attention", "triton", "nvidia-h200", schedule)
    assert src.schedule.variant == schedule["variant"] and set(src.point) == {"block_n", "num_stages"}
    assert f"_{schedule['variant']}_n" in src.generated.module_name, "the module's name spells out the variant"
    module = triton_backend.load(triton_backend.materialize(src.generated), interpret=False)
    assert module.GLUON == NUMBER[schedule["variant"]] and module.BLOCK_H == 64 and module.NUM_WARPS == 8
    for fn, *_ in module.compile_signature(max_logits=True):
        assert isinstance(fn, GluonJITFunction), "a Gluon variant renders a Gluon kernel"
    for compiled in triton_backend.compile_for(module, arch=90, aligned_strides=True):
        ptx = compiled.asm["ptx"]
        assert compiled.asm.get("cubin")
        assert ".target sm_90" in ptx
        assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16", ptx), "no wgmma"
        assert "cp.async.cg.shared.global" in ptx, "no cp.async gather"
        assert "cp.async.mbarrier.arrive.noinc" in ptx, "the gather does not signal an mbarrier"
        assert "mbarrier.try_wait" in ptx
        assert "setmaxnreg" in ptx, "no register reallocation between the partitions"
        assert compiled.metadata.shared <= get_gpu("nvidia-h200").smem_per_block


def test_gluon_max_logits_variant_compiles():
    src = resolve_kernel(V32, "sparse_attention", "triton", "nvidia-h200", GLUON)
    module = triton_backend.load(triton_backend.materialize(src.generated), interpret=False)
    sig = module.compile_signature(max_logits=True)
    assert sig[0][2]["WRITE_MAX"] is True
    assert not module.compile_signature()[0][2]["WRITE_MAX"]


@pytest.mark.parametrize("variant", ["gluon", "gluon_split"])
def test_interpreter_runs_only_the_tl_variant(variant):
    """A Gluon variant asked for on CPU tensors: the interpreter runs the tl variant, with the knobs
    they share."""
    cpu = resolve_kernel(V32, "sparse_attention", "triton", "nvidia-h200",
                         {"variant": variant, "block_n": 32, "num_stages": 3}, device_type="cpu")
    gpu = resolve_kernel(V32, "sparse_attention", "triton", "nvidia-h200", {"variant": variant})
    assert cpu.schedule.variant == "tl" and gpu.schedule.variant == variant
    assert cpu.point["block_n"] == 32 and cpu.point["num_stages"] == 3
    assert "@triton.jit" in cpu.generated.source and "gluon" not in cpu.generated.source.split("GLUON = 0")[1]
    assert "GLUON = 0" in cpu.generated.source
    assert "@gluon.jit" in gpu.generated.source and "gl.warp_specialize" in gpu.generated.source
    assert "@triton.jit" not in gpu.generated.source


@pytest.mark.parametrize("heads", [128, 96, 64, 40, 32, 16, 3])
@pytest.mark.parametrize("gpu", ["nvidia-h200", "nvidia-a100"])
def test_gluon_off_by_default(heads, gpu):
    """Never chosen unless asked for: not the default, nor the nearest legal point to an illegal default."""
    src = resolve_kernel(attention_spec(heads), "sparse_attention", "triton", gpu, None, use_db=False)
    assert src.schedule.variant == "tl"
    assert "@gluon.jit" not in src.generated.source


@pytest.mark.parametrize("override", [{"num_warps": 4}, {"block_h": 64, "num_warps": 4}, {"num_stages": 3},
                                      {"block_n": 128}, {"v_split": 2}, {"block_n": 32, "num_stages": 1}])
def test_partial_override_never_moves_to_gluon(override):
    """A schedule that does not name gluon keeps the tl kernel, even where its nearest legal point moves."""
    for gpu in ("nvidia-h200", "nvidia-a100"):
        try:
            src = resolve_kernel(V32, "sparse_attention", "triton", gpu, override, use_db=False)
        except ScheduleError:  # no legal point at all (block_n 128 on an A100)
            continue
        assert src.schedule.variant == "tl", (gpu, src.point)


@pytest.mark.parametrize("variant", ["gluon", "gluon_split"])
def test_gluon_not_for_other_gpus(variant):
    with pytest.raises(ScheduleError, match=r"variant='gluon(_split)?' cannot run on compute capability 8\.0"):
        resolve_kernel(V32, "sparse_attention", "triton", "nvidia-a100", {"variant": variant, "block_n": 32})


def test_gluon_tunes_only_its_own_knobs():
    """The Gluon kernels' block_h 64, num_warps 8, v_split 1 and index_prefetch 0 are the template's
    own numbers, not knobs; a ring of >= 2 slots of >= 32 rows that fits shared memory."""
    for bad in ({"num_warps": 4}, {"v_split": 2}, {"index_prefetch": 1}, {"block_h": 32}, {"num_stages": 1},
                {"block_n": 16}, {"block_n": 128}):
        with pytest.raises(ScheduleError, match="is not a knob|is not allowed|shared_memory"):
            resolve_kernel(V32, "sparse_attention", "triton", "nvidia-h200", GLUON | bad)


@pytest.mark.parametrize("spec,constraint", [
    (attention_spec(128, qk_dim=80, v_dim=48), "latent_512"),
    (attention_spec(64, qk_dim=256 + 64, v_dim=256), "latent_512"),
    (attention_spec(64, qk_dim=512 + 32, v_dim=512), "rope_64"),
    (attention_spec(16), "heads_at_least_32"),
    (attention_spec(12), "heads_at_least_32"),
], ids=["dv48", "dv256", "rope32", "h32", "h16"])
def test_gluon_illegal_where_unsupported(spec, constraint):
    with pytest.raises(ScheduleError, match=constraint):
        resolve_kernel(spec, "sparse_attention", "triton", "nvidia-h200", GLUON)
    with pytest.raises(ScheduleError):
        dsagen.build(spec, schedules={"sparse_attention": GLUON})


@pytest.mark.parametrize("variant", ["gluon", "gluon_split"])
def test_gluon_space_has_only_its_own_knobs(variant):
    from dsagen.plan import problem_symbols
    from dsagen.schedule import load_space

    space = load_space("triton", "sparse_attention", variant)
    assert space.variant == variant and set(space.knobs) == {"block_n", "num_stages"}
    points = space.legal_points(problem_symbols(V32, get_op("sparse_attention"), get_gpu("nvidia-h200")))
    assert {64, 32} <= {p["block_n"] for p in points}, "no legal Gluon point for V3.2"
    assert "gluon" not in load_space("triton", "sparse_attention", "tl").knobs


# ------------------------------------------------------------------------------------------------
# sm_90 GPU: the Gluon kernel against the float64 reference


@pytest.fixture
def hopper(device):
    if device.type != "cuda":
        pytest.skip("the Gluon kernel runs on CUDA only (CPU tensors run the tl kernel)")
    if torch.cuda.get_device_capability(device)[0] != 9:
        pytest.skip("the Gluon kernel is written for sm_90 (wgmma)")
    return device


def gluon_indices(gen, S: int, SKV: int, k: int) -> torch.Tensor:
    """Indices with every kind of invalid one (-2**31, -1, SKV, 2**31 - 1) mixed in; row 0 all
    invalid, row 1 a single valid index, row 2 all valid (when k <= SKV), the rest a random count."""
    bad = torch.tensor([-(2**31), -1, SKV, 2**31 - 1])
    idx = torch.empty(S, k, dtype=torch.int64)
    for t in range(S):
        if t == 0:
            n_valid = 0
        elif t == 1:
            n_valid = 1
        elif t == 2:
            n_valid = min(k, SKV)
        else:
            n_valid = int(torch.randint(1, min(k, SKV) + 1, (1,), generator=gen))
        row = torch.randperm(SKV, generator=gen)[:n_valid]
        pad = bad[torch.randint(0, 4, (k - n_valid,), generator=gen)]
        idx[t] = torch.cat([row, pad])[torch.randperm(k, generator=gen)]
    return idx.int()


def reference_max_logits(q, kv, idx, sm_scale):
    q64, kv64, ix = q.double().cpu(), kv.double().cpu(), idx.long().cpu()
    valid = (ix >= 0) & (ix < kv64.shape[0])
    rows = kv64[ix.clamp(0, kv64.shape[0] - 1)]
    scores = sm_scale * torch.einsum("shd,skd->shk", q64, rows)
    return scores.masked_fill(~valid[:, None, :], -math.inf).amax(-1)


def run_gluon(kernels, q, kv, idx, sm_scale=None, max_logits=False):
    S, H = q.shape[:2]
    at = kernels.spec.attention
    out = torch.full((S, H, at.v_dim), math.nan, dtype=torch.bfloat16, device=q.device)
    lse = torch.full((S, H), math.nan, dtype=torch.float32, device=q.device)
    ml = torch.full((S, H), math.nan, dtype=torch.float32, device=q.device) if max_logits else None
    got_out, got_lse = kernels.run("sparse_attention", q, kv, idx, sm_scale, out=out, lse=lse, max_logits=ml)
    torch.cuda.synchronize()
    return got_out, got_lse, ml


VARIANTS = pytest.mark.parametrize("variant", ["gluon", "gluon_split"])


def build_gluon(heads, k, schedule=None, variant="gluon"):
    kernels = dsagen.build(attention_spec(heads, k),
                           schedules={"sparse_attention": {"variant": variant} | (schedule or {})})
    assert kernels.resolve("sparse_attention", 7, 9, "cuda").variant == variant
    return kernels


GPU_CASES = [
    # S, SKV, heads, k, schedule
    (7, 2053, 128, 2048, None),
    (13, 301, 128, 100, None),
    (5, 4099, 64, 2048, None),
    (11, 257, 64, 100, {"block_n": 32, "num_stages": 3}),
    (9, 999, 96, 100, None),  # a second block of 64 heads, half of it past the last head
    (6, 3001, 40, 2048, {"block_n": 32, "num_stages": 2}),
    (5, 1999, 32, 2048, None),  # tensor parallelism 4: half of each 64-row wgmma is padding
    (3, 77, 128, 100, {"block_n": 32, "num_stages": 2}),  # k > SKV: every row padded with invalid ones
]


@pytest.mark.parametrize("S,SKV,H,K,schedule", GPU_CASES,
                         ids=[f"S{c[0]}-SKV{c[1]}-H{c[2]}-K{c[3]}-n{(c[4] or {}).get('block_n', 64)}"
                              for c in GPU_CASES])
@VARIANTS
def test_gluon_matches_reference(hopper, gen, S, SKV, H, K, schedule, variant):
    kernels = build_gluon(H, K, schedule, variant)
    q = torch.randn(S, H, 576, generator=gen).bfloat16().to(hopper)
    kv = torch.randn(SKV, 576, generator=gen).bfloat16().to(hopper)
    idx = gluon_indices(gen, S, SKV, K).to(hopper)
    scale = kernels.spec.attention.softmax_scale
    out, lse, ml = run_gluon(kernels, q, kv, idx, max_logits=True)
    ref_out, ref_lse = reference.sparse_attention(q.cpu(), kv.cpu(), idx.cpu(), scale, 512)
    assert_close("sparse_attention.out", out, ref_out)
    assert_close("sparse_attention.lse", lse, ref_lse)
    assert torch.all(out[0] == 0) and torch.all(torch.isposinf(lse[0])), "all-invalid row: out 0, lse +inf"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "a poisoned output was left unwritten"
    ref_ml = reference_max_logits(q, kv, idx, scale)
    assert torch.isneginf(ml[0]).all()
    torch.testing.assert_close(ml.double().cpu(), ref_ml, rtol=1e-4, atol=1e-3)


@VARIANTS
def test_gluon_agrees_with_tl_kernel(hopper, gen, variant):
    """Same inputs, the tl variant and a Gluon one: both near the reference and each other."""
    S, SKV, H, K = 17, 5001, 128, 2048
    q = torch.randn(S, H, 576, generator=gen).bfloat16().to(hopper)
    kv = torch.randn(SKV, 576, generator=gen).bfloat16().to(hopper)
    idx = gluon_indices(gen, S, SKV, K).to(hopper)
    tl_out, tl_lse, _ = run_gluon(dsagen.build(attention_spec(H, K), schedules={"sparse_attention": {"variant": "tl"}}),
                                  q, kv, idx)
    gl_out, gl_lse, _ = run_gluon(build_gluon(H, K, variant=variant), q, kv, idx)
    torch.testing.assert_close(gl_lse, tl_lse, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gl_out.float(), tl_out.float(), rtol=2e-2, atol=2e-2)


@VARIANTS
def test_gluon_scale_and_noncontiguous(hopper, gen, variant):
    S, SKV, H, K = 6, 700, 64, 100
    kernels = build_gluon(H, K, variant=variant)
    q = torch.randn(S, H + 8, 640, generator=gen).bfloat16().to(hopper)[:, 3:3 + H, :576]
    kv = torch.randn(SKV, 700, generator=gen).bfloat16().to(hopper)[:, 100:676]
    idx = gluon_indices(gen, S, SKV, K).to(hopper)
    assert not q.is_contiguous() and not kv.is_contiguous()
    out, lse, _ = run_gluon(kernels, q, kv, idx, sm_scale=0.0625)
    ref_out, ref_lse = reference.sparse_attention(q.cpu(), kv.cpu(), idx.cpu(), 0.0625, 512)
    assert_close("sparse_attention.out", out, ref_out)
    assert_close("sparse_attention.lse", lse, ref_lse)


@VARIANTS
def test_gluon_nan_rules(hopper, gen, variant):
    """docs/numerics.md: NaN in q[t, h] -> out[t, h], lse[t, h]; NaN in a kv row selected by t
    (V or rope part) -> every head of t; NaN in a kv row no token selects -> nothing."""
    S, SKV, H, K = 5, 400, 64, 100
    kernels = build_gluon(H, K, variant=variant)
    q = torch.randn(S, H, 576, generator=gen).bfloat16()
    kv = torch.randn(SKV, 576, generator=gen).bfloat16()
    idx = torch.stack([torch.randperm(SKV - 1, generator=gen)[:K] for _ in range(S)]).int()  # row SKV-1 never
    q[1, 7, 3] = math.nan
    kv[int(idx[2, 50]), 10] = math.nan  # V part, selected by token 2 (perhaps by others too)
    kv[int(idx[3, 99]), 540] = math.nan  # rope part, selected by token 3
    kv[SKV - 1, :] = math.nan  # selected by no token
    selected = [set(idx[t].tolist()) for t in range(S)]
    nan_rows = {int(idx[2, 50]), int(idx[3, 99])}
    out, lse, ml = run_gluon(kernels, q.to(hopper), kv.to(hopper), idx.to(hopper), max_logits=True)
    out, lse, ml = out.cpu(), lse.cpu(), ml.cpu()
    for t in range(S):
        token_nan = bool(selected[t] & nan_rows)
        for h in (0, 7, H - 1):
            expect = token_nan or (t == 1 and h == 7)
            assert bool(torch.isnan(out[t, h]).all()) == expect, (t, h)
            assert bool(torch.isnan(lse[t, h])) == expect, (t, h)
            assert bool(torch.isnan(ml[t, h])) == expect, (t, h)
            if not expect:
                assert not torch.isnan(out[t, h]).any()
