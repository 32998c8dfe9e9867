"""`dsagen.compat.flash_mla.flash_mla_sparse_fwd` (FlashMLA's sparse prefill) and the optional
max_logits output of the sparse attention kernels, on both backends, against float64 math.

Shapes are FlashMLA's scaled down for the CPU (h_q 64 and 128, top-k a multiple of 64) and shapes
FlashMLA refuses (h_q 1, 3, 16; top-k 100). Builds are shared between tests through the compat
build cache, so each (heads, top-k, backend) is built once. The argument checks of every compat
entry point are in tests/test_compat_args.py.
"""
from __future__ import annotations

import math

import pytest
import torch

import dsagen
from dsagen import reference
from dsagen.backends import triton as triton_backend
from dsagen.compat._builds import kernels_for
from dsagen.compat.flash_mla import flash_mla_sparse_fwd
from dsagen.kernels import resolve_kernel
from dsagen.verify import Mismatch, assert_close

BAD = (-(2**31), -1)  # plus s_kv and 2**31 - 1, which depend on the problem
D_QK, D_V = 576, 512


def make_indices(gen, s_q: int, s_kv: int, topk: int, all_invalid=(0,)) -> torch.Tensor:
    """[s_q, topk] int32: the rows in all_invalid hold only invalid values (every kind), the others
    a random number of valid rows (duplicates possible) mixed with every kind of invalid value."""
    bad = torch.tensor([*BAD, s_kv, 2**31 - 1])
    idx = torch.empty(s_q, topk, dtype=torch.int64)
    for t in range(s_q):
        n_valid = 0 if t in all_invalid else int(torch.randint(1, topk + 1, (1,), generator=gen))
        row = torch.randint(0, s_kv, (n_valid,), generator=gen)
        pad = bad[torch.randint(0, 4, (topk - n_valid,), generator=gen)]
        idx[t] = torch.cat([row, pad])[torch.randperm(topk, generator=gen)]
    return idx.int()


def make_inputs(gen, s_q: int, h_q: int, s_kv: int, topk: int, d_qk: int = D_QK, all_invalid=(0,)):
    """q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk] bf16 and indices [s_q, 1, topk] int32, in FlashMLA's layout."""
    q = torch.randn(s_q, h_q, d_qk, generator=gen).bfloat16()
    kv = torch.randn(s_kv, 1, d_qk, generator=gen).bfloat16()
    return q, kv, make_indices(gen, s_q, s_kv, topk, all_invalid)[:, None, :]


def reference_max_logits(q, kv, idx, sm_scale: float):
    """float64 sm_scale * max q . kv over each query's valid indices (-inf without one), and the
    error bound of an fp32 kernel: 4e-5 x sm_scale x max sum |q_d kv_d| (the dot products' worst
    case) plus a few ulps of the value."""
    q64, kv64 = q.double().cpu(), kv.double().cpu()
    ix = idx.long().cpu()
    valid = (ix >= 0) & (ix < kv64.shape[0])
    rows = kv64[ix.clamp(0, max(kv64.shape[0] - 1, 0))]  # [s_q, topk, d]
    scores = sm_scale * torch.einsum("shd,skd->shk", q64, rows)
    magnitude = sm_scale * torch.einsum("shd,skd->shk", q64.abs(), rows.abs())
    scores = scores.masked_fill(~valid[:, None, :], -math.inf)
    magnitude = magnitude.masked_fill(~valid[:, None, :], 0.0)
    ref = scores.amax(-1) if scores.shape[-1] else torch.full(scores.shape[:2], -math.inf, dtype=torch.float64)
    bound = 4e-5 * (magnitude.amax(-1) if magnitude.shape[-1] else torch.zeros(scores.shape[:2]))
    return ref, bound + 1e-6 * ref.abs().nan_to_num(0.0, 0.0, 0.0)


def assert_max_logits(got: torch.Tensor, q, kv, idx, sm_scale: float) -> None:
    """max_logits equals the math: NaN exactly where the reference has NaN, the same infinities,
    every finite value within the fp32 error bound."""
    ref, tol = reference_max_logits(q, kv, idx, sm_scale)
    got64 = got.detach().double().cpu()
    assert got.dtype == torch.float32 and got64.shape == ref.shape
    if not torch.equal(torch.isnan(got64), torch.isnan(ref)):
        raise Mismatch(f"max_logits: NaN at {int(torch.isnan(got64).sum())} places, "
                       f"the reference at {int(torch.isnan(ref).sum())}")
    inf = torch.isinf(ref)
    if not torch.equal(torch.isinf(got64), inf) or not torch.equal(got64[inf], ref[inf]):
        raise Mismatch("max_logits: infinities differ from the reference")
    fin = torch.isfinite(ref)
    err = (got64[fin] - ref[fin]).abs()
    if not bool((err <= tol[fin]).all()):
        worst = int((err - tol[fin]).argmax())
        raise Mismatch(f"max_logits: error {float(err[worst]):.3g} > bound {float(tol[fin][worst]):.3g}")


def check_fwd(result, q, kv, indices, sm_scale: float):
    """(out, max_logits, lse) of flash_mla_sparse_fwd against float64 math, FlashMLA's layouts."""
    out, max_logits, lse = result
    s_q, h_q = q.shape[:2]
    assert out.shape == (s_q, h_q, D_V) and out.dtype == torch.bfloat16
    assert lse.shape == (s_q, h_q) and lse.dtype == torch.float32
    idx = indices[:, 0, :]
    ref_out, ref_lse = reference.sparse_attention(q.cpu(), kv[:, 0, :].cpu(), idx.cpu(), sm_scale, D_V)
    assert_close("sparse_attention.out", out, ref_out)
    assert_close("sparse_attention.lse", lse, ref_lse)
    assert_max_logits(max_logits, q, kv[:, 0, :], idx, sm_scale)


def assert_all_invalid(result, rows) -> None:
    out, max_logits, lse = result
    for t in rows:
        assert torch.all(out[t] == 0), "a query without a valid index: out 0"
        assert torch.all(torch.isneginf(max_logits[t])), "a query without a valid index: max_logits -inf"
        assert torch.all(torch.isposinf(lse[t])), "a query without a valid index: lse +inf"


# ------------------------------------------------------------------------------------------------
# flash_mla_sparse_fwd

PEER_SHAPES = [(64, 64), (128, 128)]  # (h_q, topk): what FlashMLA accepts, few queries and keys


@pytest.mark.parametrize("h_q,topk", PEER_SHAPES, ids=[f"H{h}-K{k}" for h, k in PEER_SHAPES])
def test_flash_mla_shapes(device, backend, gen, h_q, topk):
    q, kv, idx = make_inputs(gen, 3, h_q, 150, topk)
    result = flash_mla_sparse_fwd(q.to(device), kv.to(device), idx.to(device), 0.0417, backend=backend)
    check_fwd(result, q, kv, idx, 0.0417)
    assert_all_invalid(result, [0])


REFUSED_SHAPES = [(1, 100), (3, 100), (16, 100)]  # h_q FlashMLA refuses; top-k no multiple of 64


@pytest.mark.parametrize("h_q,topk", REFUSED_SHAPES, ids=[f"H{h}-K{k}" for h, k in REFUSED_SHAPES])
def test_shapes_flash_mla_refuses(device, backend, gen, h_q, topk):
    q, kv, idx = make_inputs(gen, 4, h_q, 90, topk, all_invalid=(0, 3))
    result = flash_mla_sparse_fwd(q.to(device), kv.to(device), idx.to(device), 0.0721, backend=backend)
    check_fwd(result, q, kv, idx, 0.0721)
    assert_all_invalid(result, [0, 3])


def test_noncontiguous_inputs(device, backend, gen):
    """q strided over heads (passed as is) and with a strided last dimension (copied), kv a slice of
    a wider cache, indices with a strided last dimension: the same results as contiguous inputs."""
    s_q, h_q, s_kv, topk = 3, 16, 90, 100
    q, kv, idx = make_inputs(gen, s_q, h_q, s_kv, topk)
    wide_q = torch.zeros(s_q, 2 * h_q, D_QK, dtype=torch.bfloat16)
    wide_q[:, 1::2] = q
    transposed_q = q.transpose(1, 2).contiguous().transpose(1, 2)  # last-dimension stride h_q
    wide_kv = torch.zeros(s_kv, 2, D_QK + 64, dtype=torch.bfloat16)
    wide_kv[:, 1:2, 32:32 + D_QK] = kv
    wide_idx = torch.zeros(s_q, 1, 2 * topk, dtype=torch.int32)
    wide_idx[..., ::2] = idx
    kv_view, idx_view = wide_kv.to(device)[:, 1:2, 32:32 + D_QK], wide_idx.to(device)[..., ::2]
    for q_view in (wide_q.to(device)[:, 1::2], transposed_q.to(device)):
        assert not q_view.is_contiguous() and not kv_view.is_contiguous() and idx_view.stride(-1) == 2
        result = flash_mla_sparse_fwd(q_view, kv_view, idx_view, 0.0721, backend=backend)
        check_fwd(result, q, kv, idx, 0.0721)


def test_topk_length(device, backend, gen):
    """Only the first topk_length[i] indices of query i count (0, negative: none; past topk: all)."""
    s_q, h_q, s_kv, topk = 5, 16, 90, 100
    q, kv, idx = make_inputs(gen, s_q, h_q, s_kv, topk, all_invalid=())
    lengths = torch.tensor([0, 1, 37, topk + 5, -3], dtype=torch.int32)
    idx = idx.to(device)
    given = idx.clone()
    result = flash_mla_sparse_fwd(q.to(device), kv.to(device), idx, 0.0721, topk_length=lengths.to(device),
                                  backend=backend)
    masked = given.cpu().clone()
    for t, n in enumerate(lengths.tolist()):
        masked[t, :, max(n, 0):] = -1
    check_fwd(result, q, kv, masked, 0.0721)
    assert_all_invalid(result, [0, 4])
    assert torch.equal(idx, given), "the caller's indices are not written"


def test_latent_only_d_qk_512(device, backend, gen):
    """d_qk 512 (no rope part): kv is all V."""
    q, kv, idx = make_inputs(gen, 3, 8, 70, 40, d_qk=512)
    result = flash_mla_sparse_fwd(q.to(device), kv.to(device), idx.to(device), 0.05, backend=backend)
    check_fwd(result, q, kv, idx, 0.05)
    assert_all_invalid(result, [0])


def test_nan_enters_only_the_outputs_it_reaches(device, backend, gen):
    """A NaN in q[t, h] makes out[t, h], max_logits[t, h] and lse[t, h] NaN; one in a kv row makes
    every head of the queries that select it NaN; nothing else is NaN (docs/numerics.md)."""
    s_q, h_q, s_kv, topk = 4, 16, 90, 100
    q, kv, idx = make_inputs(gen, s_q, h_q, s_kv, topk, all_invalid=(3,))
    idx[1, 0, :] = torch.arange(topk) % 50  # query 1 selects rows 0..49 only
    idx[2, 0, :] = 50 + torch.arange(topk) % 40  # query 2 rows 50..89 only
    q[1, 5, 7] = math.nan
    kv[60, 0, 3] = math.nan  # selected by query 2 (and maybe 0), never by 1; query 3 selects nothing
    out, max_logits, lse = flash_mla_sparse_fwd(q.to(device), kv.to(device), idx.to(device), 0.0721, backend=backend)
    ref_out, ref_lse = reference.sparse_attention(q, kv[:, 0], idx[:, 0], 0.0721, D_V)
    ref_max, _ = reference_max_logits(q, kv[:, 0], idx[:, 0], 0.0721)
    assert torch.isnan(ref_max[1, 5]) and torch.isnan(ref_max[2]).all() and not torch.isnan(ref_max[1, 4])
    for name, got, ref in (("out", out, ref_out), ("lse", lse, ref_lse), ("max_logits", max_logits, ref_max)):
        nan_ref = torch.isnan(ref)
        assert torch.equal(torch.isnan(got.cpu()), nan_ref), f"{name}: NaN where the reference has none, or missing"
    keep = ~torch.isnan(ref_lse)
    assert_close("sparse_attention.lse", lse.cpu()[keep], ref_lse[keep])
    assert_close("sparse_attention.out", out.cpu()[keep], ref_out[keep])
    assert_all_invalid((out, max_logits, lse), [3])


def test_no_valid_index_at_all(device):
    """topk 0 or an empty kv: every query gets out 0, max_logits -inf, lse +inf (no launch)."""
    q = torch.randn(3, 5, D_QK).bfloat16().to(device)
    for kv, idx in ((torch.randn(9, 1, D_QK).bfloat16(), torch.zeros(3, 1, 0, dtype=torch.int32)),
                    (torch.zeros(0, 1, D_QK, dtype=torch.bfloat16), torch.zeros(3, 1, 4, dtype=torch.int32))):
        result = flash_mla_sparse_fwd(q, kv.to(device), idx.to(device), 0.1)
        assert result[0].shape == (3, 5, D_V) and result[1].shape == result[2].shape == (3, 5)
        assert_all_invalid(result, range(3))


# ------------------------------------------------------------------------------------------------
# the sparse attention kernels' max_logits output

def test_max_logits_from_the_kernels_and_the_default_path(device, backend, gen):
    """The launcher's max_logits= buffer (poisoned with NaN, as are out and lse) holds the math;
    out and lse are the default path's, and the default path (no buffer, through the
    torch.library op) still matches the reference."""
    s_q, h_q, s_kv, topk = 5, 16, 90, 100
    kernels = kernels_for(heads=h_q, topk=topk, backend=backend)
    q, kv, idx = make_inputs(gen, s_q, h_q, s_kv, topk, all_invalid=(2,))
    q, kv, idx = q.to(device), kv[:, 0].to(device), idx[:, 0].contiguous().to(device)
    out, lse = kernels.sparse_attention(q, kv, idx, 0.0721)  # the default path
    ref_out, ref_lse = reference.sparse_attention(q.cpu(), kv.cpu(), idx.cpu(), 0.0721, D_V)
    assert_close("sparse_attention.out", out, ref_out)
    assert_close("sparse_attention.lse", lse, ref_lse)

    poison = dict(out=torch.full_like(out, math.nan), lse=torch.full_like(lse, math.nan),
                  max_logits=torch.full_like(lse, math.nan))
    got_out, got_lse = kernels.run("sparse_attention", q, kv, idx, 0.0721, **poison)
    assert got_out is poison["out"] and got_lse is poison["lse"]
    assert_max_logits(poison["max_logits"], q, kv, idx, 0.0721)
    assert torch.all(torch.isneginf(poison["max_logits"][2]))
    if device.type == "cpu":  # the same arithmetic: bit for bit
        assert torch.equal(got_out, out) and torch.equal(got_lse, lse)
    else:
        assert_close("sparse_attention.out", got_out, ref_out)
        assert_close("sparse_attention.lse", got_lse, ref_lse)

    # the generated launcher itself, max_logits alone (out and lse allocated by it)
    launcher = kernels.launcher("sparse_attention", device, s_q, s_kv)
    alone = torch.full((s_q, h_q), math.nan, device=device)
    launched_out, launched_lse = launcher(q, kv, idx, 0.0721, max_logits=alone)
    assert torch.equal(alone, poison["max_logits"]) or device.type != "cpu"
    assert_close("sparse_attention.lse", launched_lse, ref_lse)
    assert_close("sparse_attention.out", launched_out, ref_out)


def test_max_logits_with_schedule_variants(device, gen):
    """Triton with the V split (several programs per query, one writes the row's maximum) and the
    index prefetch, and ragged head blocks."""
    spec = dsagen.Spec(topk=dsagen.TopKSpec(k=77), attention=dsagen.AttentionSpec(heads=40))
    schedule = {"block_h": 32, "block_n": 16, "num_warps": 4, "num_stages": 2, "v_split": 2, "index_prefetch": 1}
    kernels = dsagen.build(spec, schedules={"sparse_attention": schedule})
    q = torch.randn(3, 40, D_QK, generator=gen).bfloat16().to(device)
    kv = torch.randn(120, D_QK, generator=gen).bfloat16().to(device)
    idx = make_indices(gen, 3, 120, 77).to(device)
    max_logits = torch.full((3, 40), math.nan, device=device)
    out, lse = kernels.run("sparse_attention", q, kv, idx, 0.05, max_logits=max_logits)
    assert_max_logits(max_logits, q, kv, idx, 0.05)
    ref_out, ref_lse = reference.sparse_attention(q.cpu(), kv.cpu(), idx.cpu(), 0.05, D_V)
    assert_close("sparse_attention.out", out, ref_out)
    assert_close("sparse_attention.lse", lse, ref_lse)


def test_max_logits_buffer_is_checked(device):
    kernels = kernels_for(heads=3, topk=100)
    q = torch.zeros(2, 3, D_QK, dtype=torch.bfloat16, device=device)
    kv = torch.zeros(10, D_QK, dtype=torch.bfloat16, device=device)
    idx = torch.zeros(2, 100, dtype=torch.int32, device=device)
    for buffer, match in ((torch.zeros(2, 3, dtype=torch.float64, device=device), "max_logits must have dtype"),
                          (torch.zeros(2, 4, device=device), r"max_logits must have shape \[2, 3\]"),
                          (torch.zeros(3, 2, device=device).t(), "max_logits must be contiguous in its last"),
                          ([[0.0]], "max_logits must be a torch.Tensor")):
        with pytest.raises(ValueError, match=match):
            kernels.run("sparse_attention", q, kv, idx, 0.1, max_logits=buffer)


def test_triton_max_logits_variant_compiles_for_sm90_with_one_more_store():
    """Both Triton variants compile for sm_90; the default one stores exactly one tensor fewer
    (lse and max_logits are each one masked store): max_logits costs the default path nothing."""
    import types

    spec = dsagen.Spec(topk=dsagen.TopKSpec(k=64), attention=dsagen.AttentionSpec(heads=16))
    src = resolve_kernel(spec, "sparse_attention", "triton", "nvidia-h200", None)
    module = triton_backend.load(triton_backend.materialize(src.generated), interpret=False)
    stores = []
    for variant in (False, True):
        shim = types.SimpleNamespace(compile_signature=lambda v=variant: module.compile_signature(max_logits=v))
        (compiled,) = triton_backend.compile_for(shim, arch=90)
        assert ".target sm_90" in compiled.asm["ptx"]
        stores.append(compiled.asm["ttir"].count("tt.store"))
    assert stores[1] == stores[0] + 1, stores


def test_tvm_max_logits_variant_builds_for_cuda():
    """TVM's CUDA kernel with and without the max_logits store (source only; no GPU needed)."""
    from dsagen.backends import tvm as tvm_backend

    if problem := tvm_backend.available():
        pytest.skip(problem)
    spec = dsagen.Spec(topk=dsagen.TopKSpec(k=64), attention=dsagen.AttentionSpec(heads=16))
    built = dsagen.build(spec, backend="tvm")
    path = built.path(built.resolve("sparse_attention", device_type="cpu"))
    module = tvm_backend.load(path)
    sources = [module.build("cuda", max_logits=v).mod.imports[0].inspect_source() for v in (False, True)]
    assert all("__global__" in s for s in sources)
    assert [s.count("MAXL_ptr[") for s in sources] == [0, 1], "only the variant stores max_logits"
    assert all(s.count("LSE_ptr[") == 1 for s in sources)
