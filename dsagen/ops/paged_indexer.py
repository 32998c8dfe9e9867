"""Decode, the lightning indexer over the paged FP8 key cache (DeepGEMM's `fp8_paged_mqa_logits`
contract, for any next_n >= 1 and any head count).

    q [B, next_n, H, D] fp8 e4m3, index_cache uint8 [n_pages, page_size, 1, D + 4] (per page: its
    page_size x D fp8 keys, then their page_size fp32 scales), weights [B * next_n, H] fp32 (q's scale
    folded in), context_lens [B] or [B, next_n] int32, block_table [B, max_blocks] int32
    -> logits [B * next_n, max_blocks * page_size] fp32.

Row r = b * next_n + j is query j of request b; it sees the tokens s < context_lens[b] - next_n + j + 1
(or, given lengths per row [B, next_n], s < context_lens[b, j]; the rank decides), any page size
(token s lives in page block_table[b, s // page_size] at slot s % page_size) and gets
logits[r, s] = k_scale[s] * sum_h weights[r, h] * relu(q[b, j, h] . k[s]) there, -inf in every other
column (a visible length <= 0 gives an all -inf row). Table entries past a request's context are
never read, nor are keys past it. A table entry outside [0, n_pages) names no page: its tokens are
-inf in every row, as if outside the context, and nothing is read through it (the kernels mask it
themselves: no host sync). relu keeps NaN, as in the prefill indexer. Backends: Triton and
TVM (llvm for CPU tensors, cuda), with the same contract.

Workload (tests, tuner, bench): S = B requests, each with a context of SKV tokens and next_n = 2
query tokens, pages in a random order; the tuning database buckets a call by (B * next_n, max_blocks *
page_size), and the sampled check rows are requests.
"""
from __future__ import annotations

import torch

from ..plan import SKV, Cost, S, W, next_pow2
from .base import DECODE_TUNING, Call, Gradient, Op
from .checks import check_out, check_tensor
from .shared import INDEXER_TRAINS_THROUGH_LOSS, WORKLOAD_NEXT_N
from .signature import Signature, tensor


def check_context_lens(context_lens, n_req: int, next_n: int, device) -> None:
    """context_lens: int32 [B] (query j of request b sees s < len - next_n + j + 1) or [B, next_n]
    (it sees s < lens[b, j]), any strides for the latter; ValueError naming it otherwise."""
    if isinstance(context_lens, torch.Tensor) and context_lens.dim() == 2:
        check_tensor("context_lens", context_lens, torch.int32, (n_req, next_n), device, contiguous_last=False)
    elif isinstance(context_lens, torch.Tensor) and context_lens.dim() != 1:
        raise ValueError(f"context_lens must have shape [B] or [B, next_n] = [{n_req}] or [{n_req}, {next_n}], "
                         f"got {list(context_lens.shape)}")
    else:
        check_tensor("context_lens", context_lens, torch.int32, (n_req,), device)


class PagedIndexerOp(Op):
    name = "paged_indexer"
    position = 60
    summary = "decode lightning indexer over the paged fp8 key cache: logits [B*next_n, max_blocks*page_size]"
    backends = ("triton", "tvm")
    doc = ("logits [B * next_n, max_blocks * page_size] fp32 over each request's paged keys; query j\n"
           "of request b sees positions < context_lens[b] - next_n + j + 1 (context_lens [B]) or\n"
           "< context_lens[b, j] (context_lens [B, next_n]), -inf elsewhere.")
    needs_cache = True
    short_names = {"block_n": "n", "block_h": "hb", "key_blocks": "kb", "num_warps": "w", "num_stages": "s"}
    signature = Signature((tensor("q"), tensor("index_cache"), tensor("weights"), tensor("context_lens"),
                           tensor("block_table")))
    tuning = DECODE_TUNING
    gradient = Gradient(hint=INDEXER_TRAINS_THROUGH_LOSS)

    def semantic_fields(self, spec):
        ix, c = spec.indexer, spec.cache
        return {"heads": ix.heads, "head_dim": ix.head_dim, "page_size": c.page_size, "index_format": c.index_format}

    def template_fields(self, spec):
        ix = spec.indexer
        return {"heads": ix.heads, "head_dim": ix.head_dim, "page_size": spec.cache.page_size}

    def module_stem(self, spec):
        ix = spec.indexer
        return f"paged_indexer_h{ix.heads}_d{ix.head_dim}_p{spec.cache.page_size}"

    def derived(self, spec, point, backend):
        return {"d_pad": next_pow2(spec.indexer.head_dim, 32)}

    def problem_symbols(self, spec):
        ix = spec.indexer
        return {"heads": ix.heads, "heads_pad": next_pow2(ix.heads), "d_pad": next_pow2(ix.head_dim, 32),
                "page_size": spec.cache.page_size}

    def cost(self, spec):
        """At the workload: S requests x next_n = 2 rows, SKV keys each (W: the mean visible length)."""
        ix, n = spec.indexer, WORKLOAD_NEXT_N
        nbytes = (S * n * ix.heads * ix.head_dim  # q
                  + S * SKV * (ix.head_dim + 4)  # keys and scales, each read once
                  + S * n * ix.heads * 4 + S * 4 + S * SKV / spec.cache.page_size * 4  # weights, lens, table
                  + S * n * SKV * 4)  # logits
        return Cost(self.name, 2 * S * n * W * ix.heads * ix.head_dim, nbytes, "fp8")

    def check_args(self, spec, q, index_cache, weights, context_lens, block_table, out=None):
        ix, page_size = spec.indexer, spec.cache.page_size
        check_tensor("q", q, torch.float8_e4m3fn, (None, None, ix.heads, ix.head_dim))
        dev, (n_req, next_n) = q.device, q.shape[:2]
        if next_n < 1:
            raise ValueError(f"q must hold next_n >= 1 query tokens per request (dim 1), got {next_n}")
        check_tensor("index_cache", index_cache, torch.uint8, (None, None, 1, ix.head_dim + 4), dev)
        if index_cache.shape[1] != page_size:
            raise ValueError(f"index_cache has pages of {index_cache.shape[1]} tokens (dim 1), but the spec's "
                             f"cache.page_size is {page_size}")
        if index_cache.numel() and page_size > 1 and index_cache.stride(1) != ix.head_dim + 4:
            raise ValueError(f"index_cache must be packed within each page (stride {ix.head_dim + 4} along "
                             f"dim 1), got strides {index_cache.stride()}")
        check_tensor("weights", weights, torch.float32, (n_req * next_n, ix.heads), dev)
        check_context_lens(context_lens, n_req, next_n, dev)
        check_tensor("block_table", block_table, torch.int32, (n_req, None), dev)
        if index_cache.shape[0] >= 2**31:
            raise ValueError(f"index_cache has {index_cache.shape[0]} pages: block_table's int32 entries "
                             "name at most 2**31 - 1")
        n_cols = block_table.shape[1] * page_size
        check_out("out", out, torch.float32, (n_req * next_n, n_cols), dev)
        strides = {"q": q.stride()[:3], "index_cache": index_cache.stride()[:1], "weights": weights.stride()[:1],
                   "block_table": block_table.stride()[:1], "out": out.stride()[:1] if out is not None else ()}
        for name, used in strides.items():
            if max(used, default=0) >= 2**31:
                raise ValueError(f"{name} has a stride of 2**31 or more: the kernel takes int32 strides")
        return Call(dev, n_req * next_n, n_cols)

    def fake(self, spec, q, index_cache, weights, context_lens, block_table):
        rows = q.shape[0] * q.shape[1]
        return q.new_empty((rows, block_table.shape[1] * spec.cache.page_size), dtype=torch.float32)


PAGED_INDEXER = PagedIndexerOp()
