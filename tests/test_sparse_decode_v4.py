"""Sparse FP8 decode on DeepSeek-V4's MODEL1 cache (dsagen.cache_formats' deepseek_v4_fp8 block
format) and the V3.2 one, with the optional inputs: attention sinks, per-request top-k lengths and
the window cache (extra_cache) in the same softmax. Against the float64 reference of
dsagen/ops/sparse_decode_workload.py on both backends: page sizes 1, 53, 61 (576 once), odd heads
and k, invalid indices of every kind, lengths 0, negative and past k, outputs poisoned."""
from __future__ import annotations

import math

import pytest
import torch

import dsagen
from dsagen.cache_formats import MLA_FORMATS, MLACacheFormat, block_regions, quantize_mla_pages
from dsagen.errors import SpecError
from dsagen.spec import validate
from dsagen.ops.sparse_decode_workload import reference_sparse_decode
from dsagen.verify import assert_close

V4 = MLA_FORMATS["deepseek_v4_fp8"]
V32 = MLA_FORMATS["deepseek_v32_fp8"]
INVALID = (-(2**31), -1, None, 2**31 - 1)  # None: n_slots, the first slot past the cache


def make_spec(fmt, heads: int, k: int, page_size: int = 64) -> dsagen.Spec:
    width = fmt.latent_dim + fmt.rope_dim
    v_dim = width if fmt is V4 else fmt.latent_dim
    return dsagen.Spec(attention=dsagen.AttentionSpec(heads=heads, qk_dim=width, v_dim=v_dim),
                       topk=dsagen.TopKSpec(k=k), cache=dsagen.CacheSpec(page_size=page_size, mla_format=fmt.name))


def make_cache(gen, fmt, n_blocks: int, page_size: int, poison_from: int) -> torch.Tensor:
    """A cache of random rows (latent magnitudes 2^-6 .. 2^2 x N(0, 1) x 100, rope N(0, 1)); the
    slots from `poison_from` on hold NaN codes, so a kernel that reads one shows it."""
    n = n_blocks * page_size
    rows = torch.randn(n, fmt.latent_dim + fmt.rope_dim, generator=gen)
    rows[:, :fmt.latent_dim] *= torch.exp2(torch.randint(-6, 3, (n, 1), generator=gen).float()) * 100
    cache = quantize_mla_pages(rows.bfloat16(), fmt, page_size)
    if isinstance(fmt, MLACacheFormat):
        cache.view(n, -1)[poison_from:, :fmt.latent_dim] = 0x7F
    else:
        data, _ = block_regions(cache, fmt)
        slots = torch.arange(poison_from, n)
        data[slots // page_size, slots % page_size, :fmt.latent_dim] = 0x7F
    return cache


def make_indices(gen, B: int, s_q: int, k: int, n_owned: int, n_slots: int) -> torch.Tensor:
    """Distinct slots of [0, n_owned) per token, about a quarter replaced by invalid values of every
    kind, padded with invalid values where n_owned < k."""
    idx = torch.empty(B, s_q, k, dtype=torch.int64)
    kinds = torch.tensor([n_slots if v is None else v for v in INVALID])
    for b in range(B):
        for t in range(s_q):
            row = kinds[torch.randint(0, 4, (k,), generator=gen)]
            chosen = torch.randperm(n_owned, generator=gen)[:k]
            row[:chosen.numel()] = chosen
            drop = torch.rand(k, generator=gen) < 0.25
            row[drop] = kinds[torch.randint(0, 4, (k,), generator=gen)][drop]
            idx[b, t] = row[torch.randperm(k, generator=gen)]
    return idx.int()


def problem(gen, fmt, B, s_q, H, k, page_size, n_blocks=None):
    n_blocks = n_blocks or -(-2 * k // page_size) + 1
    n_slots = n_blocks * page_size
    n_owned = max(1, n_slots - page_size // 2)  # the slots past n_owned are never selected
    cache = make_cache(gen, fmt, n_blocks, page_size, n_owned)
    q = torch.randn(B, s_q, H, fmt.latent_dim + fmt.rope_dim, generator=gen).bfloat16()
    return q, cache, make_indices(gen, B, s_q, k, n_owned, n_slots)


def run_checked(kernels, fmt, device, q, cache, idx, sm_scale, **optional):
    """The kernel into NaN-poisoned outputs, checked against the float64 reference; (out, lse) on the host."""
    B, s_q, H = q.shape[:3]
    spec = kernels.spec
    out = torch.full((B, s_q, H, spec.attention.v_dim), math.nan, dtype=torch.bfloat16, device=device)
    lse = torch.full((B, s_q, H), math.nan, device=device)
    moved = {name: t.to(device) for name, t in optional.items()}
    kernels.sparse_decode(q.to(device), cache.to(device), idx.to(device), sm_scale, **moved, out=out, lse=lse)
    ref_out, ref_lse = reference_sparse_decode(q, cache, idx, sm_scale, fmt, **optional)
    assert_close("sparse_decode.out", out, ref_out)
    assert_close("sparse_decode.lse", lse, ref_lse)
    return out.cpu(), lse.cpu()


def lengths(gen, B: int, k: int) -> torch.Tensor:
    """Per-request lengths cycling through 0, negative, past k and random ones within k."""
    fixed = [0, -3, k + 4, 2**31 - 1]
    return torch.tensor([fixed[b] if b < len(fixed) and b % 2 else int(torch.randint(1, k + 1, (1,), generator=gen))
                         for b in range(B)], dtype=torch.int32)


CASES = [
    # format, B, s_q, H, k, page_size
    (V4, 2, 2, 3, 5, 1),
    (V4, 4, 1, 10, 37, 53),
    (V4, 2, 2, 3, 37, 61),
    (V4, 1, 1, 3, 5, 576),
    (V32, 4, 2, 3, 37, 61),
    (V32, 2, 1, 10, 5, 1),
]


@pytest.mark.parametrize("fmt,B,s_q,H,k,page_size", CASES,
                         ids=[f"{c[0].name}-B{c[1]}-sq{c[2]}-H{c[3]}-k{c[4]}-page{c[5]}" for c in CASES])
def test_sparse_decode_v4_matches_reference(device, backend, gen, fmt, B, s_q, H, k, page_size):
    """Random sinks and per-request lengths (0, negative, past k among them) on either format."""
    kernels = dsagen.build(make_spec(fmt, H, k, page_size), backend=backend)
    q, cache, idx = problem(gen, fmt, B, s_q, H, k, page_size)
    sink = torch.randn(H, generator=gen) * 3
    n = lengths(gen, B, k)
    out, lse = run_checked(kernels, fmt, device, q, cache, idx, 0.0625, attn_sink=sink, topk_length=n)
    for b in range(B):
        if n[b] <= 0:  # nothing selected: exactly 0 and +inf, whatever the sink
            assert (out[b] == 0).all() and (lse[b] == math.inf).all()
    run_checked(kernels, fmt, device, q, cache, idx, 0.0625)  # the specialization without optional inputs


# per backend: one program / task per token's indices, and a split with its combine (the sink
# applies once, after it)
SPLIT_OR_NOT = {
    "triton": ({"k_split": 1}, {"k_split": 2, "block_n": 16, "block_h": 16}),
    "tvm": ({"cpu_k_split": 1, "cuda_k_split": 1},
            {"cpu_k_split": 2, "cpu_block_n": 16, "cpu_block_h": 16, "cuda_k_split": 2, "cuda_block_n": 8}),
}


def test_sparse_decode_v4_sinks_and_splits(device, backend, gen):
    """Sinks -inf (no effect), +inf (the head's out 0, lse kept), 0 and random; a NaN sink gives NaN
    out for that head only (where it has a valid key); split k's combine applies the sink once."""
    H, k, ps = 5, 37, 53
    q, cache, idx = problem(gen, V4, 3, 2, H, k, ps)
    idx[2, 1] = -1  # a token without a valid index: out 0, lse +inf, whatever its sink
    sink = torch.tensor([-math.inf, math.inf, 0.0, 1.5, -2.0])
    for schedule in SPLIT_OR_NOT[backend]:
        kernels = dsagen.build(make_spec(V4, H, k, ps), backend=backend, schedules={"sparse_decode": schedule})
        out, lse = run_checked(kernels, V4, device, q, cache, idx, 0.0625, attn_sink=sink)
        assert (out[:, :, 1] == 0).all() and (out[2, 1] == 0).all() and (lse[2, 1] == math.inf).all()
        plain, plain_lse = kernels.sparse_decode(q.to(device), cache.to(device), idx.to(device), 0.0625)
        assert torch.equal(out[:, :, 0], plain[:, :, 0].cpu()) and torch.equal(lse, plain_lse.cpu())
        nan_sink = sink.clone()
        nan_sink[3] = math.nan
        got, _ = kernels.sparse_decode(q.to(device), cache.to(device), idx.to(device), 0.0625,
                                       attn_sink=nan_sink.to(device))
        got = got.cpu()
        assert got[:2, :, 3].isnan().all() and not got[:, :, [0, 1, 2, 4]].isnan().any()
        assert (got[2, 1] == 0).all()


def test_sparse_decode_v4_nan_in_a_selected_row(device, backend, gen):
    """A NaN scale byte (0xFF) of a selected row poisons that token's heads only."""
    H, k, ps = 3, 5, 53
    q, cache, idx = problem(gen, V4, 2, 1, H, k, ps)
    idx[:] = -1
    idx[0, 0, 0], idx[1, 0, 0] = 3, 4
    _, scales = block_regions(cache, V4)
    scales[0, 3, 2] = 0xFF
    kernels = dsagen.build(make_spec(V4, H, k, ps), backend=backend)
    out, lse = kernels.sparse_decode(q.to(device), cache.to(device), idx.to(device), 0.0625)
    assert out[0].isnan().all() and lse[0].isnan().all()
    assert not out[1].isnan().any() and not lse[1].isnan().any()


def test_sparse_decode_v4_window_cache(device, backend, gen):
    """extra_cache (its own page size and block count) with extra_indices of any width k2, cut by
    extra_topk_length: one softmax over both selections, sinks after it; an empty main selection
    leaves the window alone."""
    H, k, ps = 3, 37, 61
    q, cache, idx = problem(gen, V4, 3, 2, H, k, ps)
    x_cache = make_cache(gen, V4, 3, 7, 19)
    x_idx = make_indices(gen, 3, 2, 9, 19, 21)
    idx[1] = -1
    sink = torch.randn(H, generator=gen)
    for schedule in SPLIT_OR_NOT[backend]:
        kernels = dsagen.build(make_spec(V4, H, k, ps), backend=backend, schedules={"sparse_decode": schedule})
        run_checked(kernels, V4, device, q, cache, idx, 0.0625, attn_sink=sink, topk_length=lengths(gen, 3, k),
                    extra_cache=x_cache, extra_indices=x_idx,
                    extra_topk_length=torch.tensor([9, 0, 4], dtype=torch.int32))
    run_checked(kernels, V4, device, q, cache[:0], idx, 0.0625, extra_cache=x_cache, extra_indices=x_idx)


def test_sparse_decode_v4_bad_arguments(device):
    kernels = dsagen.build(make_spec(V4, 3, 5, 2))
    gen = torch.Generator().manual_seed(0)
    q, cache, idx = (t.to(device) for t in problem(gen, V4, 1, 1, 3, 5, 2))
    with pytest.raises(ValueError, match="attn_sink must have shape"):
        kernels.sparse_decode(q, cache, idx, attn_sink=torch.zeros(4, device=device))
    with pytest.raises(ValueError, match="topk_length must have dtype torch.int32"):
        kernels.sparse_decode(q, cache, idx, topk_length=torch.zeros(1, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="extra_cache and extra_indices go together"):
        kernels.sparse_decode(q, cache, idx, extra_cache=cache)
    with pytest.raises(ValueError, match="mla_cache must have shape"):
        kernels.sparse_decode(q, torch.zeros(2, 2, 1, 656, dtype=torch.uint8, device=device), idx)
    odd_stride = torch.zeros(4096, dtype=torch.uint8, device=device).as_strided((2, 2, 1, 584), (1169, 584, 584, 1))
    with pytest.raises(ValueError, match="mla_cache must pack each block"):
        kernels.sparse_decode(q, odd_stride, idx)


def test_spec_takes_the_block_format_with_its_dims():
    """A deepseek_v4_fp8 spec needs qk_dim = v_dim = 512 (one-line SpecError naming both keys);
    any page size >= 1; the V3.2 rule stands."""
    validate(make_spec(V4, 3, 5, 61))
    with pytest.raises(SpecError, match="attention.qk_dim and attention.v_dim must both be 512"):
        validate(dsagen.Spec(cache=dsagen.CacheSpec(mla_format="deepseek_v4_fp8")))
    with pytest.raises(SpecError, match="cache.page_size=0"):
        validate(make_spec(V4, 3, 5, 0))
    with pytest.raises(SpecError, match="cache.page_size=0"):
        validate(make_spec(V32, 3, 5, 0))


def test_compat_decode_reads_the_model1_cache_in_one_kernel(device, gen, monkeypatch):
    """flash_mla_with_kvcache on the MODEL1 cache with a window cache, sinks and lengths: one
    sparse_decode launch (no gathered rows through the prefill kernel), equal to the reference."""
    from dsagen.compat import flash_mla
    from dsagen.kernels import DSAKernels

    launched = []
    for name in ("sparse_decode", "sparse_attention"):
        def spy(self, *args, _name=name, _run=getattr(DSAKernels, name), **kwargs):
            launched.append(_name)
            return _run(self, *args, **kwargs)
        monkeypatch.setattr(DSAKernels, name, spy)
    B, s_q, H, k, ps = 3, 2, 3, 5, 53
    q, cache, idx = problem(gen, V4, B, s_q, H, k, ps)
    x_cache, x_idx = make_cache(gen, V4, 2, 7, 14), make_indices(gen, B, s_q, 3, 14, 14)
    sink, n, x_n = torch.randn(H, generator=gen), lengths(gen, B, k), torch.tensor([3, -1, 2], dtype=torch.int32)
    moved = [t.to(device) for t in (q, cache, idx, sink, x_cache, x_idx, n, x_n)]
    out, lse = flash_mla.flash_mla_with_kvcache(moved[0], moved[1], None, None, 512, flash_mla.get_mla_metadata()[0],
                                                None, 0.0625, False, True, *moved[2:])
    assert launched == ["sparse_decode"]
    ref_out, ref_lse = reference_sparse_decode(q, cache, idx, 0.0625, V4, attn_sink=sink, topk_length=n,
                                               extra_cache=x_cache, extra_indices=x_idx, extra_topk_length=x_n)
    assert_close("sparse_decode.out", out, ref_out)
    assert_close("sparse_decode.lse", lse, ref_lse.transpose(1, 2))


def test_sparse_decode_v4_workload(device, backend):
    """The tuner's and bench's recipe on the MODEL1 cache (page size 53): a padded block cache, the
    sampled check, the naive baseline against the reference."""
    from dsagen.ops.sparse_decode import SPARSE_DECODE
    from dsagen.workloads import workload

    spec = make_spec(V4, 3, 37, 53)
    kernels = dsagen.build(spec, backend=backend)
    wl = workload(SPARSE_DECODE)
    inputs = wl.inputs(spec, 2, 75, device, seed=1)
    q, cache, idx, _ = inputs
    assert q.shape == (2, 2, 3, 512) and cache.shape[1:] == (53, 1, 584) and cache.stride(0) == 54 * 576
    result = kernels.sparse_decode(*inputs, **wl.poisoned_outputs(spec, inputs))
    assert "RMS ratio" in wl.check(spec, inputs, result, torch.arange(2))
    naive_out, _ = wl.naive(spec, inputs)()
    ref_out, _ = wl.reference(spec, *inputs)
    assert_close("sparse_decode.out", naive_out, ref_out)
