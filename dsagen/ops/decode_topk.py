"""Decode, the top-k selector with the page-table transform fused in: the k largest paged-indexer
logits of each query row's visible prefix, emitted as cache slots.

    logits [B * next_n, n_cols] fp32 (row r = b * next_n + j), context_lens [B] or [B, next_n] int32,
    block_table [B, max_blocks] int32 -> slots [B, next_n, k] int32.

next_n = rows / B (exactly). Row r sees the positions [0, visible) with visible =
clamp(context_lens[b] - next_n + j + 1, 0, min(n_cols, max_blocks * page_size)), or with lengths per
row [B, next_n] clamp(context_lens[b, j], ...) (the rank decides; any page size): a position past
the block table has no page, so it is not in the window; no column at or past it is read. Its k
largest logits there are selected exactly: NaN ranks above +inf (docs/numerics.md), every NaN ties
with every other and -0 with +0, and ties go to the LOWER position, so the selected set is unique.
Each selected position p is emitted as the slot block_table[b, p // page_size] * page_size + p %
page_size, computed in int64: a negative entry, or a slot that does not fit an int32, gives -1
instead (never a wrapped slot; an entry past the cache's pages gives a slot past it, which
sparse_decode skips), as dsagen.decode.positions_to_slots does. Then -1 pads the rows whose window
holds fewer than k keys. Order: the
schedule knob `sorted` = 1 emits each row by ascending position, the same bytes whatever schedule
ran (what a deterministic, batch-invariant build pins); by default the order is deterministic too
and the same for every split, but it depends on the radix_bits, levels and candidates knobs.

The Triton kernel is made for few rows of long windows: each row is split over many programs (rows x
chunks; the chunk count gives every SM `waves` programs when rows are few and is one per row when
they are many), and only the speed depends on the split. A histogram pass counts the row's keys by
their top radix_bits bits (integer atomics into a per-row histogram, plus each chunk's own counts);
a collect pass writes every key in a bin above the k-th largest's bin straight to the output and
sets that bin's keys aside as candidates when they fit (else, with levels = 2, counts them by their
next radix_bits bits and a second collect pass does the same one level down). Each program places
its keys after those of the chunks before it (their recorded counts say how many), so each level's
keys land in position order, with no atomics on the output. A finish program per row picks the still
missing keys among the candidates in registers (ties to the lower position), or, when the bin
overflowed the candidate buffer, finishes the row with radix passes of its own; then it orders
(sorted), transforms and pads. No host sync and no size that depends on values: a CUDA graph
captures it.

On TVM (templates/tvm/decode_topk.py.j2) each row is one CPU task (llvm) or one thread block
(cuda) running an exact radix select of its window; both emit every row by ascending position,
so their bytes are the canonical ones (those of the Triton kernel with sorted = 1) whatever the
`sorted` knob says.

Workload (tests, tuner, bench): S = B requests of SKV tokens each, next_n = 2 query rows, pages
shuffled across requests, random logits with -inf past each row's window (as the paged indexer
writes them); the sampled check rows are requests.
"""
from __future__ import annotations

import sympy as sp
import torch

from ..plan import Cost, S, W, next_pow2
from .base import DECODE_TUNING, Call, Op, Tuning
from .checks import check_out, check_tensor
from .paged_indexer import check_context_lens
from .shared import WORKLOAD_NEXT_N
from .signature import Signature, tensor


def request_rows(logits, context_lens, out=None) -> int:
    """next_n: the rows per request (logits rows / B); with no request, out's or 1."""
    n_req = context_lens.shape[0]
    if n_req == 0:
        return out.shape[1] if out is not None and out.dim() == 3 else 1
    return logits.shape[0] // n_req


class DecodeTopKOp(Op):
    name = "decode_topk"
    position = 80
    summary = ("decode top-k: cache slots [B, next_n, k] int32 of each query row's k largest visible logits "
               "(page table applied), -1 padded")
    backends = ("triton", "tvm")
    doc = ("slots [B, next_n, k] int32: the k largest logits of each query row's visible prefix\n"
           "(row b * next_n + j sees positions < context_lens[b] - next_n + j + 1, or < context_lens[b, j]\n"
           "for context_lens [B, next_n]; ties to the lower position), each turned into its cache slot\n"
           "through block_table, then -1 padding.")
    needs_cache = True
    short_names = {"block_n": "n", "chunk": "c", "waves": "wv", "radix_bits": "r", "levels": "l",
                   "candidates": "cd", "sorted": "srt", "num_warps": "w"}
    signature = Signature((tensor("logits"), tensor("context_lens"), tensor("block_table")))
    # several short launches: a decode step replays them from a CUDA graph; sorted = 1 makes the
    # output order independent of the split
    tuning = Tuning(timing="graph", deterministic_knobs={"sorted": 1}, canonical_shape=DECODE_TUNING.canonical_shape)

    def semantic_fields(self, spec):
        return {"k": spec.topk.k, "page_size": spec.cache.page_size}

    def module_stem(self, spec):
        return f"decode_topk_k{spec.topk.k}_p{spec.cache.page_size}"

    def derived(self, spec, point, backend):
        return {"k_pad": next_pow2(spec.topk.k, 16)}

    def problem_symbols(self, spec):
        return {"k": spec.topk.k, "k_pad": next_pow2(spec.topk.k, 16), "page_size": spec.cache.page_size}

    def cost(self, spec):
        """At the workload: S requests x next_n = 2 rows; each row's visible logits read once (W: the
        mean visible length), k slots written per row (and at most k table entries read)."""
        rows, k = S * WORKLOAD_NEXT_N, spec.topk.k
        return Cost(self.name, sp.Integer(0), rows * W * 4 + S * 4 + rows * k * 4 * 2, "none")

    def check_args(self, spec, logits, context_lens, block_table, out=None):
        k = spec.topk.k
        check_tensor("logits", logits, torch.float32, (None, None))
        dev, (rows, n_cols) = logits.device, logits.shape
        if not isinstance(context_lens, torch.Tensor) or context_lens.dim() != 2:
            check_tensor("context_lens", context_lens, torch.int32, (None,), dev)
        n_req = context_lens.shape[0]
        if n_req == 0 and rows:
            raise ValueError(f"context_lens holds no request, but logits has {rows} rows")
        if n_req and rows % n_req:
            raise ValueError(f"logits has {rows} rows, which is no multiple of the {n_req} requests of "
                             "context_lens (row b * next_n + j is query j of request b)")
        if n_cols >= 2**30:
            raise ValueError(f"logits has {n_cols} columns: at most 2**30 - 1")
        next_n = request_rows(logits, context_lens, out)
        check_context_lens(context_lens, n_req, next_n, dev)
        check_tensor("block_table", block_table, torch.int32, (n_req, None), dev)
        check_out("out", out, torch.int32, (n_req, next_n, k), dev)
        strides = {"logits": logits.stride()[:1], "block_table": block_table.stride()[:1],
                   "out": out.stride()[:2] if out is not None else ()}
        for name, used in strides.items():
            if max(used, default=0) >= 2**31:
                raise ValueError(f"{name} has a stride of 2**31 or more: the kernel takes int32 strides")
        return Call(dev, rows, n_cols)

    def fake(self, spec, logits, context_lens, block_table):
        next_n = request_rows(logits, context_lens)
        return logits.new_empty((context_lens.shape[0], next_n, spec.topk.k), dtype=torch.int32)


DECODE_TOPK = DecodeTopKOp()
