"""One decode step over paged FP8 caches (write -> paged indexer -> decode top-k -> sparse decode),
and the drop-in DeepGEMM / FlashMLA entry points, against float64 references."""
from __future__ import annotations

import math

import pytest
import torch

import dsagen
from dsagen import reference
from dsagen.cache_formats import MLA_FORMATS, dequantize_mla_rows, pack_index_pages
from dsagen.compat import deep_gemm, flash_mla
from dsagen.decode import decode_windows, positions_to_slots
from dsagen.ops.decode_topk_workload import decode_topk_reference
from dsagen.ops.paged_indexer_workload import paged_indexer_reference
from dsagen.verify import assert_close, assert_topk, tolerance

FMT = MLA_FORMATS["deepseek_v32_fp8"]


def serving_spec(index_heads=3, index_dim=40, k=9, heads=5, page_size=16):
    return dsagen.Spec(indexer=dsagen.IndexerSpec(heads=index_heads, head_dim=index_dim, dtype="fp8_e4m3"),
                       topk=dsagen.TopKSpec(k=k), attention=dsagen.AttentionSpec(heads=heads, qk_dim=576, v_dim=512),
                       cache=dsagen.CacheSpec(page_size=page_size))


class Batch:
    """A batch of requests with shuffled pages in both caches and the host-side float64 truth."""

    def __init__(self, spec, gen, context_lens, next_n, max_blocks, device):
        ix, at, page = spec.indexer, spec.attention, spec.cache.page_size
        B = len(context_lens)
        n_pages = B * max_blocks + 2
        perm = torch.randperm(n_pages, generator=gen)
        self.block_table = perm[:B * max_blocks].reshape(B, max_blocks).int()
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32)
        n_slots = n_pages * page
        # index keys: fp8 codes and power-of-two scales per token, packed per page
        keys = (torch.randn(n_slots, ix.head_dim, generator=gen) * 20).clamp(-448, 448).to(torch.float8_e4m3fn)
        scales = torch.exp2(torch.randint(-3, 3, (n_slots,), generator=gen).float())
        self.index_cache = pack_index_pages(keys, scales, page)
        self.keys64, self.scales64 = keys.double(), scales.double()
        # MLA rows written by the cache writer kernel into every slot
        self.rows = (torch.randn(n_slots, 576, generator=gen) * 3).bfloat16()
        self.mla_cache = torch.full((n_pages, page, 1, FMT.bytes_per_token), 0xAB, dtype=torch.uint8)
        self.q = torch.randn(B, next_n, at.heads, 576, generator=gen).bfloat16()
        self.index_q = (torch.randn(B, next_n, ix.heads, ix.head_dim, generator=gen) * 8).to(torch.float8_e4m3fn)
        self.weights = torch.randn(B * next_n, ix.heads, generator=gen)
        self.next_n, self.page, self.max_blocks = next_n, page, max_blocks
        self.device = device

    def on_device(self, *names):
        return [getattr(self, n).to(self.device) for n in names]

    def reference_logits(self):
        """float64 logits [B * next_n, max_blocks * page] from the math, -inf outside the prefix."""
        B, width = self.block_table.shape[0], self.max_blocks * self.page
        out = torch.full((B * self.next_n, width), -math.inf, dtype=torch.float64)
        for b in range(B):
            pos = torch.arange(width)
            slot = self.block_table[b].long()[pos // self.page] * self.page + pos % self.page
            k, s = self.keys64[slot], self.scales64[slot]
            for j in range(self.next_n):
                r = b * self.next_n + j
                visible = int(self.context_lens[b]) - self.next_n + j + 1
                scores = (self.index_q[b, j].double() @ k.T).clamp_min(0)  # [H, width]
                logits = (self.weights[r].double()[:, None] * scores).sum(0) * s
                out[r, :max(visible, 0)] = logits[:max(visible, 0)]
        return out


@pytest.mark.parametrize("next_n,context_lens", [(2, [37, 5, 20]), (1, [40, 1]), (4, [9, 33])],
                         ids=["B3-n2", "B2-n1", "B2-n4"])
def test_a_decode_step_matches_the_float64_pipeline(gen, device, next_n, context_lens):
    spec = serving_spec()
    kernels = dsagen.build(spec)
    batch = Batch(spec, gen, context_lens, next_n, max_blocks=3, device=device)
    mla_cache, rows = batch.on_device("mla_cache", "rows")
    all_slots = torch.arange(rows.shape[0], dtype=torch.int32, device=device)
    kernels.mla_cache_write(rows, all_slots, mla_cache)
    q, index_q, index_cache, weights, context, table = batch.on_device(
        "q", "index_q", "index_cache", "weights", "context_lens", "block_table")
    res = kernels.decode(q, mla_cache, index_q, index_cache, weights, context, table)

    logits64 = batch.reference_logits()
    ks, ke = decode_windows(batch.context_lens, next_n)
    positions = kernels.topk(kernels.paged_indexer(index_q, index_cache, weights, context, table),
                             ks.to(device), ke.to(device))
    assert_topk(positions, logits64, ks, ke, spec.topk.k, tolerance=tolerance("indexer.logits.fp8_e4m3"))
    slots = positions_to_slots(positions, table, spec.cache.page_size, next_n)
    # the decode top-k picks the same slots (ties to the lower position in both), in its own order
    assert torch.equal(res.slots.sort(-1).values, slots.sort(-1).values)

    cache_rows = dequantize_mla_rows(mla_cache.cpu().reshape(-1, FMT.bytes_per_token), FMT)
    B = len(context_lens)
    ref_out, ref_lse = reference.sparse_attention(
        batch.q.reshape(B * next_n, spec.attention.heads, 576), cache_rows, res.slots.cpu().reshape(B * next_n, -1),
        spec.attention.softmax_scale, 512)
    assert_close("sparse_decode.out", res.out.reshape(B * next_n, spec.attention.heads, 512), ref_out)
    assert_close("sparse_decode.lse", res.lse.reshape(B * next_n, spec.attention.heads), ref_lse)


# entries outside 5 pages: the size, size + 1, a page far off, -1 and the int32 extremes
OUTSIDE_5_PAGES = (5, 6, 99, -1, 2**31 - 1, -(2**31))


def between_poison_pages(cache, spare=2):
    """The cache as a view into a buffer with `spare` pages of 0xFF bytes (NaN codes, scales and
    rope values) on each side: whatever is read through an entry outside the cache brings NaN."""
    wide = torch.full((cache.shape[0] + 2 * spare, *cache.shape[1:]), 0xFF, dtype=torch.uint8, device=cache.device)
    wide[spare:spare + cache.shape[0]] = cache
    return wide[spare:spare + cache.shape[0]]


def table_outside_5_pages():
    """Three requests of 4 pages each: every value of OUTSIDE_5_PAGES once, real pages between."""
    bad = OUTSIDE_5_PAGES
    return torch.tensor([[0, bad[0], 1, bad[4]], [2, bad[2], bad[3], 3], [4, bad[5], bad[1], 0]], dtype=torch.int32)


def test_decode_with_table_entries_outside_the_caches(gen, device, backend):
    """With 5 pages, a table entry of 5, 6, 99, -1, 2**31 - 1 or -2**31 inside a context: the paged
    indexer gives that page's tokens -inf (nothing read: the caches lie between pages of 0xFF), the
    top-k emits slots of real pages only (each request sees more than k real tokens), and the
    attention matches the float64 reference over those slots."""
    spec = serving_spec()
    kernels = dsagen.build(spec, backend=backend)
    batch = Batch(spec, gen, [64, 64, 60], 2, max_blocks=1, device=device)  # 3 x 1 + 2 = 5 pages
    table = table_outside_5_pages().to(device)
    mla_cache = between_poison_pages(batch.mla_cache.to(device))
    kernels.mla_cache_write(batch.rows.to(device), torch.arange(5 * 16, dtype=torch.int32, device=device), mla_cache)
    index_cache = between_poison_pages(batch.index_cache.to(device))
    q, index_q, weights, context = batch.on_device("q", "index_q", "weights", "context_lens")
    res = kernels.decode(q, mla_cache, index_q, index_cache, weights, context, table)

    logits = kernels.paged_indexer(index_q, index_cache, weights, context, table)
    assert_close("indexer.logits.fp8_e4m3", logits, paged_indexer_reference(index_q, index_cache, weights, context,
                                                                             table))
    want = decode_topk_reference(logits, context, table, spec.topk.k, 16)
    assert torch.equal(res.slots.cpu().sort(-1).values, want.sort(-1).values)
    entries = table.cpu().long()
    real = torch.where((entries >= 0) & (entries < 5), entries, -1)[:, None, None, :]  # each request's real pages
    assert ((res.slots.cpu().long()[..., None] // 16) == real).any(-1).all()

    cache_rows = dequantize_mla_rows(mla_cache.cpu().reshape(-1, FMT.bytes_per_token), FMT)
    ref_out, ref_lse = reference.sparse_attention(batch.q.reshape(6, spec.attention.heads, 576), cache_rows,
                                                  res.slots.cpu().reshape(6, -1), spec.attention.softmax_scale, 512)
    assert_close("sparse_decode.out", res.out.reshape(6, spec.attention.heads, 512), ref_out)
    assert_close("sparse_decode.lse", res.lse.reshape(6, spec.attention.heads), ref_lse)


def test_decode_of_no_request_keeps_next_n(device, backend):
    """No request and next_n = 2: the top-k cannot tell next_n from zero logits rows, and decode()
    still returns [0, 2, ...] outputs."""
    spec = serving_spec()
    kernels = dsagen.build(spec, backend=backend)
    at, ix = spec.attention, spec.indexer
    q = torch.zeros(0, 2, at.heads, 576, dtype=torch.bfloat16, device=device)
    mla_cache = torch.zeros(4, 16, 1, FMT.bytes_per_token, dtype=torch.uint8, device=device)
    index_q = torch.zeros(0, 2, ix.heads, ix.head_dim, dtype=torch.float8_e4m3fn, device=device)
    index_cache = torch.zeros(4, 16, 1, ix.head_dim + 4, dtype=torch.uint8, device=device)
    weights = torch.zeros(0, ix.heads, device=device)
    context = torch.zeros(0, dtype=torch.int32, device=device)
    table = torch.zeros(0, 3, dtype=torch.int32, device=device)
    res = kernels.decode(q, mla_cache, index_q, index_cache, weights, context, table)
    assert res.out.shape == (0, 2, at.heads, 512) and res.lse.shape == (0, 2, at.heads)
    assert res.slots.shape == (0, 2, spec.topk.k) and res.slots.dtype == torch.int32


def test_decode_traces_with_no_graph_break(gen, device):
    import torch._dynamo

    spec = serving_spec()
    kernels = dsagen.build(spec)
    batch = Batch(spec, gen, [21, 6], 2, max_blocks=2, device=device)
    args = batch.on_device("q", "mla_cache", "index_q", "index_cache", "weights", "context_lens", "block_table")
    eager = kernels.decode(*args)
    torch._dynamo.reset()
    assert torch._dynamo.explain(kernels.decode)(*args).graph_break_count == 0
    compiled = torch.compile(kernels.decode, fullgraph=True)(*args)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_decode_needs_a_cache_section():
    with pytest.raises(ValueError, match=r"needs a spec with a \[cache\] section"):
        dsagen.build(dsagen.Spec()).decode(*[None] * 7)


# ------------------------------------------------------------------------------------------------
# drop-in entry points

@pytest.mark.parametrize("heads", [64, 3], ids=["H64-peer-shape", "H3-refused-by-peer"])
def test_deep_gemm_fp8_mqa_logits(gen, device, heads):
    S, N, D = 6, 41, 128
    q = (torch.randn(S, heads, D, generator=gen) * 8).to(torch.float8_e4m3fn)
    k = (torch.randn(N, D, generator=gen) * 8).to(torch.float8_e4m3fn)
    k_scale = torch.rand(N, generator=gen) + 0.5
    w = torch.randn(S, heads, generator=gen)
    ks = torch.randint(0, 10, (S,), generator=gen).int()
    ke = (ks + torch.randint(0, N, (S,), generator=gen).int()).clamp(max=N)
    got = deep_gemm.fp8_mqa_logits(*(t.to(device) for t in (q,)), (k.to(device), k_scale.to(device)),
                                   w.to(device), ks.to(device), ke.to(device), clean_logits=True)
    assert_close("indexer.logits.fp8_e4m3", got, reference.indexer(q, k, k_scale, w, ks, ke))


@pytest.mark.parametrize("heads,next_n,max_context_len", [(32, 2, 48), (16, 3, 64), (5, 4, 40)],
                         ids=["H32-n2-peer-shape", "H16-n3-wider", "H5-n4-narrower"])
def test_deep_gemm_fp8_paged_mqa_logits(gen, device, heads, next_n, max_context_len):
    spec = serving_spec(index_heads=heads, index_dim=128)
    batch = Batch(spec, gen, [45, 7], next_n, max_blocks=3, device=device)
    q, cache, w, context, table = batch.on_device("index_q", "index_cache", "weights", "context_lens", "block_table")
    meta = deep_gemm.get_paged_mqa_logits_metadata(context, 16, 132)
    got = deep_gemm.fp8_paged_mqa_logits(q, cache, w, context, table, meta, max_context_len, clean_logits=True)
    assert got.shape == (2 * next_n, max_context_len)
    ref = batch.reference_logits()
    width = min(ref.shape[1], max_context_len)
    want = torch.full((2 * next_n, max_context_len), -math.inf, dtype=torch.float64)
    want[:, :width] = ref[:, :width]
    assert_close("indexer.logits.fp8_e4m3", got, want)


def test_deep_gemm_fp8_paged_mqa_logits_with_entries_outside_the_cache(gen, device):
    """DeepGEMM's entry point over 5 pages with entries 5, 6, 99, -1, 2**31 - 1 and -2**31 inside
    the contexts: -inf for those pages' tokens, nothing read through them, the rest as the math."""
    spec = serving_spec(index_heads=32, index_dim=128)
    batch = Batch(spec, gen, [64, 64, 60], 2, max_blocks=1, device=device)  # 5 pages
    table = table_outside_5_pages().to(device)
    cache = between_poison_pages(batch.index_cache.to(device))
    q, w, context = batch.on_device("index_q", "weights", "context_lens")
    meta = deep_gemm.get_paged_mqa_logits_metadata(context, 16, 132)
    got = deep_gemm.fp8_paged_mqa_logits(q, cache, w, context, table, meta, 80, clean_logits=True)
    want = torch.full((6, 80), -math.inf, dtype=torch.float64)
    want[:, :64] = paged_indexer_reference(q, cache, w, context, table)
    assert_close("indexer.logits.fp8_e4m3", got, want)
    outside = ((table < 0) | (table >= 5)).cpu().repeat_interleave(16, 1).repeat_interleave(2, 0)
    assert (got.cpu()[:, :64][outside] == -math.inf).all()


@pytest.mark.parametrize("h_q", [64, 16], ids=["H64-peer-shape", "H16-refused-by-peer"])
def test_flash_mla_with_kvcache_sparse_fp8(gen, device, h_q):
    spec = serving_spec(heads=h_q, k=11)
    batch = Batch(spec, gen, [30, 12], 2, max_blocks=2, device=device)
    rows = batch.rows
    cache = batch.mla_cache.clone()
    n_slots = rows.shape[0]
    from dsagen.cache_formats import quantize_mla_rows

    cache.reshape(n_slots, -1)[:] = quantize_mla_rows(rows, FMT)
    indices = torch.randint(0, n_slots, (2, 2, 11), generator=gen).int()
    indices[0, 1, 3:] = -1
    indices[1, 0, :] = n_slots  # an all-invalid query
    meta, splits = flash_mla.get_mla_metadata()
    out, lse = flash_mla.flash_mla_with_kvcache(batch.q.to(device), cache.to(device), None, None, 512, meta, splits,
                                                softmax_scale=0.1, causal=False, is_fp8_kvcache=True,
                                                indices=indices.to(device))
    assert out.shape == (2, 2, h_q, 512) and lse.shape == (2, h_q, 2)
    ref_out, ref_lse = reference.sparse_attention(batch.q.reshape(4, h_q, 576),
                                                  dequantize_mla_rows(cache.reshape(n_slots, -1), FMT),
                                                  indices.reshape(4, 11), 0.1, 512)
    assert_close("sparse_decode.out", out.reshape(4, h_q, 512), ref_out)
    assert_close("sparse_decode.lse", lse.transpose(1, 2).reshape(4, h_q), ref_lse)
    assert torch.isinf(lse[1, :, 0]).all() and (out[1, 0] == 0).all()
    with pytest.raises(ValueError, match="use one metadata object per shape"):
        flash_mla.flash_mla_with_kvcache(batch.q[:1].to(device), cache.to(device), None, None, 512, meta, None,
                                         is_fp8_kvcache=True, indices=indices[:1].to(device))
    with pytest.raises(ValueError, match="sparse FP8 path only"):
        flash_mla.flash_mla_with_kvcache(batch.q.to(device), cache.to(device), None, None, 512, meta, None)
