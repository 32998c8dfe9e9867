"""Stages 1 + 2 fused: each row's k largest indexer logits selected while they are computed, so
the S x SKV logits are never written (Triton)."""
from __future__ import annotations

import torch

from ..plan import Cost, S, next_pow2
from .base import Call, Gradient, Op
from .indexer import INDEXER_ARGS, check_indexer_inputs, indexer_cost, indexer_symbols
from .shared import INDEXER_TRAINS_THROUGH_LOSS
from .signature import Signature
from .topk import check_topk_out


class IndexerTopKOp(Op):
    name = "indexer_topk"
    position = 40
    summary = "fused indexer + top-k: int32 indices [S, k] without writing the S x SKV logits"
    doc = ("indices [S, k] int32: the k largest indexer logits of each row's window, selected while\n"
           "they are computed (the S x SKV logits are never written). Triton backend only.")
    backends = ("triton",)
    short_names = {"block_m": "m", "block_h": "hb", "block_n": "n", "radix_bits": "r", "num_warps": "w",
                   "num_stages": "s", "sample": "smp", "candidates": "c"}
    signature = Signature(INDEXER_ARGS)
    gradient = Gradient(hint=INDEXER_TRAINS_THROUGH_LOSS)

    def semantic_fields(self, spec):
        ix = spec.indexer
        return {"heads": ix.heads, "head_dim": ix.head_dim, "dtype": ix.dtype, "k": spec.topk.k}

    def module_stem(self, spec):
        ix = spec.indexer
        return f"indexer_topk_h{ix.heads}_d{ix.head_dim}_{ix.dtype}_k{spec.topk.k}"

    def derived(self, spec, point, backend):
        # the per-row kernel's dot has one row's heads as M: at least 16 of them
        row_block_h = point["block_h"] if point["block_m"] == 1 else max(16, min(64, next_pow2(spec.indexer.heads)))
        return {"d_pad": next_pow2(spec.indexer.head_dim, 32), "row_block_h": row_block_h}

    def problem_symbols(self, spec):
        return indexer_symbols(spec) | {"k": spec.topk.k}

    def cost(self, spec):
        c = indexer_cost(spec, S * spec.topk.k * 4)
        return Cost(self.name, c.flops, c.bytes, c.compute_unit)

    def check_args(self, spec, q, k, k_scale, weights, ks, ke, out=None):
        dev, n_q, n_kv = check_indexer_inputs(spec, q, k, k_scale, weights, ks, ke)
        check_topk_out(spec, out, n_q, dev)
        return Call(dev, n_q, n_kv)

    def fake(self, spec, q, k, k_scale, weights, ks, ke):
        return q.new_empty((q.shape[0], spec.topk.k), dtype=torch.int32)


INDEXER_TOPK = IndexerTopKOp()
