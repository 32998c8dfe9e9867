"""Sparse FP8 decode (dsagen/ops/sparse_decode.py) against a float64 reference from the math: the
whole cache dequantized on the host (dsagen/cache_formats.py), then dense softmax over each token's
valid slots. Odd heads, odd k, contexts shorter than k, partial last pages in shuffled page
tables, invalid slots of every kind, all-invalid tokens, large scales, split k, poisoned outputs; on
both backends (the schedule test is Triton's: tests/test_tvm_decode.py varies the TVM schedules)."""
from __future__ import annotations

import math

import pytest
import torch

from dsagen.workloads import workload
import dsagen
import dsagen.ops.sparse_decode as sd
from dsagen import reference
from dsagen.cache_formats import MLA_FORMATS, dequantize_mla_rows, quantize_mla_rows
from dsagen.verify import Mismatch, assert_close

FMT = MLA_FORMATS["deepseek_v32_fp8"]
D = FMT.latent_dim + FMT.rope_dim


def make_spec(heads: int, k: int, page_size: int = 64) -> dsagen.Spec:
    return dsagen.Spec(attention=dsagen.AttentionSpec(heads=heads), topk=dsagen.TopKSpec(k=k),
                       cache=dsagen.CacheSpec(page_size=page_size))


def make_cache(gen, contexts: list[int], page_size: int, spare_pages: int = 2, max_log2_scale: int = 0):
    """A cache holding each request's context in pages of a shuffled page table (the last page of a
    request partly filled), plus spare pages; every slot no context owns holds NaN codes, so a read
    of one shows. Returns (cache, slot_of: list of [context] slot tensors)."""
    pages = [-(-n // page_size) for n in contexts]
    n_pages = sum(pages) + spare_pages
    n_slots = n_pages * page_size
    rows = torch.randn(n_slots, D, generator=gen)
    # per-row magnitudes: latent values up to 448 * 2**max_log2_scale (scales up to that power)
    mag = torch.exp2(torch.randint(-6, max_log2_scale + 1, (n_slots, 1), generator=gen).float())
    rows[:, :FMT.latent_dim] *= mag * 100
    cache = quantize_mla_rows(rows, FMT)
    order = torch.randperm(n_pages, generator=gen)
    slot_of, owned, used = [], torch.zeros(n_slots, dtype=torch.bool), 0
    for n, p in zip(contexts, pages):
        table = order[used:used + p]
        used += p
        pos = torch.arange(n)
        slots = table[pos // page_size] * page_size + pos % page_size
        owned[slots] = True
        slot_of.append(slots)
    cache[~owned, :FMT.latent_dim] = 0x7F  # NaN codes in every slot no request owns
    return cache.reshape(n_pages, page_size, 1, FMT.bytes_per_token), slot_of


def make_indices(gen, slot_of, s_q: int, k: int, n_slots: int, all_invalid=()) -> torch.Tensor:
    """Per (request, token): distinct random slots of its context (token j of s_q sees the context
    up to its own position), about a quarter of them replaced by invalid values of the four kinds,
    the rest padded with invalid values, all shuffled; (b, t) in all_invalid: only invalid values."""
    B = len(slot_of)
    invalid = torch.tensor([-(2**31), -1, n_slots, 2**31 - 1], dtype=torch.int64)
    idx = torch.empty(B, s_q, k, dtype=torch.int64)
    for b in range(B):
        n = slot_of[b].numel()
        for t in range(s_q):
            seen = max(1, n - s_q + t + 1)
            chosen = slot_of[b][torch.randperm(seen, generator=gen)[:k]]
            row = invalid[torch.randint(0, 4, (k,), generator=gen)]
            row[:chosen.numel()] = chosen
            drop = torch.rand(k, generator=gen) < 0.25
            row[drop] = invalid[torch.randint(0, 4, (k,), generator=gen)][drop]
            if (b, t) in all_invalid:
                row = invalid[torch.randint(0, 4, (k,), generator=gen)]
            idx[b, t] = row[torch.randperm(k, generator=gen)]
    return idx.int()


def expected(q, cache, idx, sm_scale):
    """float64: the whole cache dequantized, then the prefill reference over the flat slots."""
    B, s_q, H, _ = q.shape
    rows = dequantize_mla_rows(cache.reshape(-1, FMT.bytes_per_token), FMT)
    out, lse = reference.sparse_attention(q.reshape(B * s_q, H, D), rows, idx.reshape(B * s_q, -1), sm_scale,
                                          FMT.latent_dim)
    return out.reshape(B, s_q, H, -1), lse.reshape(B, s_q, H)


def problem(gen, B, s_q, H, k, page_size, contexts=None, max_log2_scale=0, all_invalid=((0, 0),)):
    contexts = contexts or [int(torch.randint(1, 3 * k, (1,), generator=gen)) for _ in range(B)]
    cache, slot_of = make_cache(gen, contexts, page_size, max_log2_scale=max_log2_scale)
    n_slots = cache.shape[0] * cache.shape[1]
    idx = make_indices(gen, slot_of, s_q, k, n_slots, all_invalid)
    q = torch.randn(B, s_q, H, D, generator=gen).bfloat16()
    return q, cache, idx


def poisoned(B, s_q, H):
    return (torch.full((B, s_q, H, FMT.latent_dim), math.nan, dtype=torch.bfloat16),
            torch.full((B, s_q, H), math.nan))


def run_checked(kernels, q, cache, idx, sm_scale, device):
    out, lse = (t.to(device) for t in poisoned(*q.shape[:3]))
    got_out, got_lse = kernels.sparse_decode(q.to(device), cache.to(device), idx.to(device), sm_scale, out=out, lse=lse)
    assert got_out.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr()
    ref_out, ref_lse = expected(q, cache, idx, sm_scale)
    assert_close("sparse_decode.out", got_out, ref_out)
    assert_close("sparse_decode.lse", got_lse, ref_lse)
    return got_out.cpu(), got_lse.cpu()


CASES = [
    # B, s_q, H, k, page_size, contexts (None: random, some shorter than k)
    (3, 1, 1, 7, 1, [5, 1, 40]),
    (2, 2, 3, 37, 16, [20, 50]),
    (2, 4, 16, 37, 64, [70, 3]),
    (2, 3, 64, 37, 16, [33, 129]),
    (1, 2, 128, 19, 64, None),
    (2, 4, 128, 64, 1, [50, 200]),
]


@pytest.mark.parametrize("B,s_q,H,k,page_size,contexts", CASES,
                         ids=[f"B{c[0]}-sq{c[1]}-H{c[2]}-k{c[3]}-page{c[4]}" for c in CASES])
def test_sparse_decode_matches_reference(device, backend, gen, B, s_q, H, k, page_size, contexts):
    kernels = dsagen.build(make_spec(H, k, page_size), backend=backend)
    q, cache, idx = problem(gen, B, s_q, H, k, page_size, contexts, all_invalid={(0, 0), (B - 1, s_q - 1)})
    out, lse = run_checked(kernels, q, cache, idx, 0.0721, device)
    for b, t in {(0, 0), (B - 1, s_q - 1)}:  # tokens without a valid slot: exactly 0 and +inf
        assert (out[b, t] == 0).all() and (lse[b, t] == math.inf).all()


SCHEDULES = [
    {"block_h": 16, "block_n": 16, "k_split": 2, "num_warps": 4, "num_stages": 1},
    {"block_h": 32, "block_n": 16, "k_split": 4, "num_warps": 4, "num_stages": 3},
    {"block_h": 16, "block_n": 64, "k_split": 1, "num_warps": 8, "num_stages": 1},
    {"block_h": 16, "block_n": 16, "k_split": 4, "num_warps": 4, "num_stages": 2, "prefetch": 1},
    {"block_h": 32, "block_n": 32, "k_split": 1, "num_warps": 4, "num_stages": 1, "prefetch": 1},
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_sparse_decode_schedules_and_split_k(device, gen, schedule):
    """Split k: slices without a valid slot, all-invalid tokens and k not a multiple of anything."""
    kernels = dsagen.build(make_spec(20, 71, 16), schedules={"sparse_decode": schedule})
    q, cache, idx = problem(gen, 2, 2, 20, 71, 16, [100, 9], all_invalid={(1, 0)})
    idx[0, 1, :40] = -1  # the first slices of this token have no valid slot
    out, lse = run_checked(kernels, q, cache, idx, 0.0721, device)
    assert (out[1, 0] == 0).all() and (lse[1, 0] == math.inf).all()


def test_sparse_decode_large_scales(device, backend, gen):
    """Latent values up to 448 * 2**10 (scales up to 2**10): scores far from 1, still exact in fp32."""
    kernels = dsagen.build(make_spec(3, 13, 16), backend=backend)
    q, cache, idx = problem(gen, 2, 2, 3, 13, 16, [30, 17], max_log2_scale=10, all_invalid=())
    scales = cache.reshape(-1, FMT.bytes_per_token)[:, FMT.scale_offset:FMT.rope_offset].contiguous().view(torch.float32)
    assert scales.max() >= 2**8
    run_checked(kernels, q, cache, idx, 0.0721, device)


def test_sparse_decode_strided_inputs_and_outputs(device, backend, gen):
    """q and indices sliced from wider buffers, pages with a padded stride, outputs inside bigger
    buffers: accepted and equal to the contiguous call."""
    H, k, ps = 5, 11, 4
    kernels = dsagen.build(make_spec(H, k, ps), backend=backend)
    q, cache, idx = problem(gen, 3, 2, H, k, ps, [9, 14, 3])
    base_out, base_lse = kernels.sparse_decode(q.to(device), cache.to(device), idx.to(device), 0.25)
    q_wide = torch.randn(3, 2, H + 2, D + 8).bfloat16()
    q_wide[:, :, 1:H + 1, :D] = q
    idx_wide = torch.full((3, 2, k + 5), 7, dtype=torch.int32)
    idx_wide[..., 2:k + 2] = idx
    cache_wide = torch.zeros(cache.shape[0], ps + 3, 1, FMT.bytes_per_token, dtype=torch.uint8)
    cache_wide[:, :ps] = cache
    out_wide = torch.full((3, 2, H, FMT.latent_dim + 16), -7.0, dtype=torch.bfloat16)
    lse_wide = torch.full((3, 2, H + 1), -7.0)
    args = (q_wide[:, :, 1:H + 1, :D], cache_wide[:, :ps], idx_wide[..., 2:k + 2])
    assert not any(a.is_contiguous() for a in args)
    out, lse = out_wide.to(device), lse_wide.to(device)
    kernels.sparse_decode(*(a.to(device) for a in args), 0.25,
                          out=out[..., :FMT.latent_dim], lse=lse[..., :H])
    assert torch.equal(out[..., :FMT.latent_dim].cpu(), base_out.cpu())
    assert torch.equal(lse[..., :H].cpu(), base_lse.cpu())
    assert (out[..., FMT.latent_dim:] == -7).all() and (lse[..., H:] == -7).all()  # nothing outside written


# per backend: one program / task per token's indices, and a split with its combine
SPLIT_OR_NOT = {
    "triton": ({"k_split": 1}, {"k_split": 2, "block_n": 16, "block_h": 16}),
    "tvm": ({"cpu_k_split": 1, "cuda_k_split": 1},
            {"cpu_k_split": 2, "cpu_block_n": 16, "cpu_block_h": 16, "cuda_k_split": 2, "cuda_block_n": 8}),
}


def test_sparse_decode_nan_rules(device, backend, gen):
    """A NaN in q[b, t, h] poisons that head only; a NaN code in a selected row poisons that token's
    heads; NaN in a row nobody selects changes nothing. Also through the split-k combine."""
    H, k, ps = 3, 33, 16
    q, cache, idx = problem(gen, 2, 2, H, k, ps, [40, 50], all_invalid=())
    idx[1, 1, 0] = idx[1, 1, 1] = -1
    q[0, 1, 2, 7] = math.nan
    victim = int(idx[1, 0][(idx[1, 0] >= 0) & (idx[1, 0] < cache.shape[0] * ps)][0])
    cache.view(-1, FMT.bytes_per_token)[victim, 5] = 0xFF  # a NaN fp8 code (negative sign)
    for schedule in SPLIT_OR_NOT[backend]:
        kernels = dsagen.build(make_spec(H, k, ps), backend=backend, schedules={"sparse_decode": schedule})
        out, lse = kernels.sparse_decode(q.to(device), cache.to(device), idx.to(device), 0.3)
        out, lse = out.cpu(), lse.cpu()
        nan = (idx == victim).any(-1)[..., None].expand(2, 2, H).clone()  # every token selecting it
        nan[0, 1, 2] = True
        assert nan[1, 0].all() and not nan.all()
        assert torch.equal(torch.isnan(lse), nan)
        assert torch.equal(torch.isnan(out).all(-1), nan) and torch.equal(torch.isnan(out).any(-1), nan)
        ref_out, ref_lse = expected(q, cache, idx, 0.3)
        assert torch.equal(torch.isnan(ref_lse), nan)  # the reference agrees
        assert_close("sparse_decode.out", out[~nan], ref_out[~nan])
        assert_close("sparse_decode.lse", lse[~nan], ref_lse[~nan])


def test_sparse_decode_refuses_bad_arguments(device, backend, gen):
    spec = make_spec(3, 5, 16)
    kernels = dsagen.build(spec, backend=backend)
    q, cache, idx = (t.to(device) for t in problem(gen, 1, 2, 3, 5, 16, [10]))
    bad = [
        ((q.float(), cache, idx), "q must have dtype"),
        ((q[:, :, :2], cache, idx), r"q must have shape \[\*, \*, 3, 576\]"),
        ((q.transpose(2, 3).contiguous().transpose(2, 3), cache, idx), "q must be contiguous in its last dimension"),
        ((q, cache.view(torch.int8), idx), "mla_cache must have dtype torch.uint8"),
        ((q, cache[..., :655], idx), r"mla_cache must have shape \[\*, \*, 1, 656\]"),
        ((q, torch.zeros(2 * 16 * 656 + 1, dtype=torch.uint8, device=device)[1:].view(2, 16, 1, 656), idx),
         "mla_cache rows must start at multiples of 4 bytes"),
        ((q, cache, idx.long()), "indices must have dtype torch.int32"),
        ((q, cache, idx[..., :4]), r"indices must have shape \[1, 2, 5\]"),
        ((q, cache, idx[:, :1]), r"indices must have shape \[1, 2, 5\]"),
        ((q, cache, idx, 0.0), "sm_scale=0.0 must be a finite number > 0"),
        ((q, cache, idx, math.nan), "sm_scale=nan must be a finite number > 0"),
        ((q, cache, idx, "0.1"), "sm_scale='0.1' must be a finite number"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            kernels.run("sparse_decode", *args)
    with pytest.raises(ValueError, match=r"out must have shape \[1, 2, 3, 512\]"):
        kernels.sparse_decode(q, cache, idx, out=torch.empty(1, 2, 3, 576, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="lse must have dtype torch.float32"):
        kernels.sparse_decode(q, cache, idx, lse=torch.empty(1, 2, 3, dtype=torch.bfloat16, device=device))


def test_sparse_decode_default_scale_empty_batch_and_op_path(device, backend, gen):
    """sm_scale None is the spec's; B = 0 and s_q = 0 return empty outputs; the torch.library op
    (no output buffers) and its fake implementation give the launcher's shapes."""
    spec = make_spec(2, 6, 16)
    kernels = dsagen.build(spec, backend=backend)
    q, cache, idx = (t.to(device) for t in problem(gen, 2, 3, 2, 6, 16, [8, 21]))
    out, lse = kernels.run("sparse_decode", q, cache, idx)  # through dsagen::sparse_decode
    ref_out, ref_lse = expected(q.cpu(), cache.cpu(), idx.cpu(), spec.attention.softmax_scale)
    assert_close("sparse_decode.out", out, ref_out)
    assert_close("sparse_decode.lse", lse, ref_lse)
    for shape in ((0, 3), (2, 0)):
        o, l_ = kernels.sparse_decode(q.new_zeros(*shape, 2, D), cache, idx.new_zeros(*shape, 6))
        assert o.shape == (*shape, 2, 512) and l_.shape == (*shape, 2)
    o, l_ = kernels.sparse_decode(q, cache[:0], idx)  # an empty cache: no slot is valid
    assert (o == 0).all() and (l_ == math.inf).all()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fc, fi = (mode.from_tensor(t) for t in (q, cache, idx))
        fo, fl = torch.ops.dsagen.sparse_decode(fq, fc, fi, 0.5, None, None, None, None, None, kernels.handle)
    assert fo.shape == (2, 3, 2, 512) and fo.dtype == torch.bfloat16 and fl.shape == (2, 3, 2)


def test_sparse_decode_catches_a_wrong_output(device, backend, gen):
    kernels = dsagen.build(make_spec(3, 8, 16), backend=backend)
    q, cache, idx = problem(gen, 1, 2, 3, 8, 16, [30], all_invalid=())
    out, lse = kernels.sparse_decode(q.to(device), cache.to(device), idx.to(device), 0.3)
    ref_out, ref_lse = expected(q, cache, idx, 0.3)
    assert_close("sparse_decode.out", out, ref_out)
    with pytest.raises(Mismatch, match="RMS ratio"):
        assert_close("sparse_decode.out", torch.cat([out[:, :1], -out[:, 1:]], 1), ref_out)
    lse[0, 0, 1] = math.nan  # as if unwritten
    with pytest.raises(Mismatch, match="NaN"):
        assert_close("sparse_decode.lse", lse, ref_lse)


def test_sparse_decode_workload(device, backend):
    """The tuner's and bench's recipe: B requests x next_n = 2 tokens, k > context for one shape;
    poisoned outputs, the sampled check, the naive baseline; buckets by B * next_n rows."""
    op = sd.SparseDecodeOp()
    spec = make_spec(3, 37, 16)
    kernels = dsagen.build(spec, backend=backend)
    assert "sparse_decode" in kernels.kernels()
    assert not op.enabled(dsagen.Spec(attention=spec.attention, topk=spec.topk), "triton")  # no [cache]
    assert op.enabled(spec, "triton") and op.enabled(spec, "tvm")
    for B, ctx in ((3, 20), (2, 75)):
        inputs = workload(op).inputs(spec, B, ctx, device, seed=1)
        q, cache, idx, scale = inputs
        assert q.shape == (B, 2, 3, D) and idx.shape == (B, 2, 37) and scale == spec.attention.softmax_scale
        call = op.check_args(spec, *inputs)
        assert (call.S, call.SKV) == (2 * B, -(-ctx // 16) * 16)
        valid = idx[(idx >= 0)]
        assert valid.numel() > 0 and (valid < cache.shape[0] * 16).all()
        for row in idx.reshape(-1, 37):
            v = row[row >= 0]
            assert v.unique().numel() == v.numel()  # distinct slots
        result = kernels.sparse_decode(*inputs, **workload(op).poisoned_outputs(spec, inputs))
        assert "RMS ratio" in workload(op).check(spec, inputs, result, torch.arange(B))
        naive_out, naive_lse = workload(op).naive(spec, inputs)()
        ref_out, ref_lse = workload(op).reference(spec, *inputs)
        assert_close("sparse_decode.out", naive_out, ref_out)
        assert torch.equal(torch.isinf(naive_lse.cpu()), torch.isinf(ref_lse))  # its lse has bf16 scores
    flops, _ = op.cost(spec).evaluate(workload(op).sizes(128, 32768))
    assert flops == 2 * 128 * 2 * 3 * 37 * (576 + 512)
