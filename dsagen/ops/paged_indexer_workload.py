"""The paged indexer's workload: B requests of SKV tokens each, next_n = 2 query tokens, pages
shuffled across requests; checked against the float64 logits on sampled requests."""
from __future__ import annotations

import math

import torch

from ..cache_formats import pack_index_pages, pow2_scale, unpack_index_pages
from ..verify import assert_close
from .decode_topk_workload import row_ends
from .shared import INDEXER_LOGITS_TOLERANCES, WORKLOAD_NEXT_N
from .workload import Workload, generator


def paged_indexer_reference(q, index_cache, weights, context_lens, block_table):
    """float64 logits written from the math: keys dequantized on the host, gathered through the
    block table for the visible tokens only; a token whose entry names no page stays -inf.
    context_lens: [B] (row j sees s < len - next_n + j + 1) or [B, next_n] (row j sees s < lens[b, j])."""
    n_req, next_n, heads, head_dim = q.shape
    n_pages, page_size = index_cache.shape[:2]
    n_cols = block_table.shape[1] * page_size
    keys, scales = unpack_index_pages(index_cache.cpu(), head_dim)
    q64, w64 = q.cpu().double(), weights.cpu().double().reshape(n_req, next_n, heads)
    ends, table = row_ends(context_lens.cpu(), next_n).reshape(n_req, next_n), block_table.cpu().long()
    out = torch.full((n_req * next_n, n_cols), -math.inf, dtype=torch.float64)
    if n_pages == 0:  # no entry names a page
        return out
    for b in range(n_req):
        n = min(int(ends[b].max()), n_cols) if next_n else 0  # the keys some row of b sees
        if n <= 0:
            continue
        s = torch.arange(n)
        page = table[b, s // page_size]
        in_page = (page >= 0) & (page < n_pages)
        token = torch.where(in_page, page, 0) * page_size + s % page_size
        scores = torch.einsum("jhd,sd->jhs", q64[b], keys[token])
        scores = torch.where(scores < 0, torch.zeros_like(scores), scores)  # relu that keeps NaN
        logits = torch.einsum("jhs,jh->js", scores, w64[b]) * scales[token][None, :]
        logits = logits.masked_fill(~in_page[None, :], -math.inf)
        for j in range(next_n):
            visible = min(int(ends[b, j]), n_cols)
            if visible > 0:
                out[b * next_n + j, :visible] = logits[j, :visible]
    return out


def quantize_index_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float keys [n, D] -> (fp8 e4m3 keys, fp32 power-of-two scales): the cache's quantization."""
    scale = pow2_scale(keys.double().abs().amax(-1))
    codes = (keys.double() / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes, scale.float()


def paged_indexer_inputs(spec, n_req: int, context: int, device, seed: int, next_n: int = WORKLOAD_NEXT_N):
    """B requests of `context` tokens each, pages shuffled across requests; q's scale is folded
    into the weights (as the caller does)."""
    ix, page_size = spec.indexer, spec.cache.page_size
    g = generator(device, seed)
    max_blocks = -(-context // page_size)
    n_pages = n_req * max_blocks
    q = (torch.randn(n_req, next_n, ix.heads, ix.head_dim, device=device, generator=g) * 4).to(torch.float8_e4m3fn)
    keys, scales = quantize_index_keys(torch.randn(n_pages * page_size, ix.head_dim, device=device, generator=g))
    cache = pack_index_pages(keys, scales, page_size)
    table = torch.randperm(n_pages, device=device, generator=g).reshape(n_req, max_blocks).int()
    weights = torch.randn(n_req * next_n, ix.heads, device=device, generator=g) / ix.heads
    lens = torch.full((n_req,), context, dtype=torch.int32, device=device)
    return q, cache, weights, lens, table


def naive_paged_indexer(q, index_cache, weights, context_lens, block_table, chunk: int = 8):
    """Gather each request's keys to a dense [B, max_ctx, D] with torch, then bf16 einsums (torch has
    no fp8 einsum), in chunks of requests."""
    n_req, next_n, heads, head_dim = q.shape
    n_pages, page_size = index_cache.shape[:2]
    n_cols = block_table.shape[1] * page_size
    flat = index_cache.reshape(n_pages, -1)
    keys = flat[:, :page_size * head_dim].contiguous().view(torch.float8_e4m3fn).reshape(n_pages, page_size, head_dim)
    scales = flat[:, page_size * head_dim:].contiguous().view(torch.float32)
    out = torch.empty(n_req * next_n, n_cols, dtype=torch.float32, device=q.device)
    cols = torch.arange(n_cols, device=q.device)
    in_page = (block_table >= 0) & (block_table < n_pages)  # entries past a context may be anything
    table = torch.where(in_page, block_table.long(), 0)
    no_page = (~in_page).repeat_interleave(page_size, dim=1)  # [B, n_cols]
    for b0 in range(0, n_req, chunk):
        t = table[b0:b0 + chunk]
        k = keys[t].reshape(t.shape[0], n_cols, head_dim).to(torch.bfloat16)
        scores = torch.einsum("bjhd,bsd->bjhs", q[b0:b0 + chunk].to(torch.bfloat16), k).float().relu_()
        w = weights[b0 * next_n:(b0 + t.shape[0]) * next_n].reshape(t.shape[0], next_n, heads)
        logits = torch.einsum("bjhs,bjh->bjs", scores, w) * scales[t].reshape(t.shape[0], 1, n_cols)
        visible = row_ends(context_lens[b0:b0 + chunk], next_n).reshape(-1, next_n)
        logits = logits.masked_fill(cols[None, None, :] >= visible[..., None], -math.inf)
        logits = logits.masked_fill(no_page[b0:b0 + chunk, None, :], -math.inf)
        out[b0 * next_n:(b0 + t.shape[0]) * next_n] = logits.reshape(-1, n_cols)
    return out


class PagedIndexerWorkload(Workload):
    kernel = "paged_indexer"
    naive_name = "gather pages to dense + bf16 einsum (chunks of 8 requests)"
    tolerances = {"logits": INDEXER_LOGITS_TOLERANCES["logits.fp8_e4m3"]}  # the fp8 indexer's math, paged

    def reference(self, spec, q, index_cache, weights, context_lens, block_table):
        return paged_indexer_reference(q, index_cache, weights, context_lens, block_table)

    def inputs(self, spec, S_, SKV_, device, seed):
        return paged_indexer_inputs(spec, S_, SKV_, device, seed)

    def poisoned_outputs(self, spec, inputs):
        q, block_table = inputs[0], inputs[4]
        shape = (q.shape[0] * q.shape[1], block_table.shape[1] * spec.cache.page_size)
        return {"out": torch.full(shape, math.nan, device=q.device)}

    def check(self, spec, inputs, result, rows):
        """rows: requests (the workload's S axis); each is checked on all its next_n logits rows."""
        q, cache, weights, lens, table = inputs
        next_n = q.shape[1]
        b = rows.to(q.device).long()
        r = (b[:, None] * next_n + torch.arange(next_n, device=q.device)).reshape(-1)
        ref = paged_indexer_reference(q[b], cache, weights[r], lens[b], table[b])
        ratio = assert_close("paged_indexer.logits", result[r], ref, self.tolerance("logits"))
        return f"float64 reference on {len(rows)} requests x {next_n} rows, RMS ratio {ratio:.2e}"

    def naive(self, spec, inputs):
        return lambda: naive_paged_indexer(*inputs)

    def call_shape(self, S_, SKV_):
        return 2 * S_, SKV_  # the workload's B requests x next_n = 2 query rows; each row's context

    def shape_info(self, spec, S_, SKV_):
        ix = spec.indexer
        return {"S": S_, "SKV": SKV_, "B": S_, "next_n": WORKLOAD_NEXT_N, "context": SKV_, "H": ix.heads, "D": ix.head_dim,
                "page_size": spec.cache.page_size}

    def sizes(self, S_, SKV_):
        return {"S": S_, "SKV": SKV_, "W": SKV_ - (WORKLOAD_NEXT_N - 1) / 2}


WORKLOAD = PagedIndexerWorkload()
