"""Stages 1 + 2 fused: each row's k largest indexer logits selected while they are computed, so
the S x SKV logits are never written (Triton)."""
from __future__ import annotations

import torch

from .. import reference
from ..verify import assert_topk
from . import register
from .base import INDEXER_TRAINS_THROUGH_LOSS, Call, Cost, Op, S, causal_window_mean, few_keys_warning, next_pow2
from .indexer import IndexerOp, check_indexer_inputs, indexer_cost, indexer_inputs, indexer_symbols, naive_indexer
from .topk import check_topk_out, naive_topk, poisoned_indices


class IndexerTopKOp(Op):
    name = "indexer_topk"
    position = 40
    summary = "fused indexer + top-k: int32 indices [S, k] without writing the S x SKV logits"
    backends = ("triton",)
    short_names = {"block_m": "m", "block_h": "hb", "block_n": "n", "radix_bits": "r", "num_warps": "w",
                   "num_stages": "s", "sample": "smp", "candidates": "c"}
    naive_name = "bf16 einsum indexer, then torch.topk"
    no_backward_hint = INDEXER_TRAINS_THROUGH_LOSS
    args = (("q", "Tensor"), ("k", "Tensor"), ("k_scale", "Tensor?"), ("weights", "Tensor"), ("ks", "Tensor"),
            ("ke", "Tensor"))

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

    def reference(self, spec, q, k, k_scale, weights, ks, ke):
        logits = reference.indexer(q, k, k_scale, weights, ks, ke)
        return reference.topk_values(logits, ks, ke, spec.topk.k)

    def inputs(self, spec, S_, SKV_, device, seed):
        return indexer_inputs(spec, S_, SKV_, device, seed)

    def poisoned_outputs(self, spec, inputs):
        return poisoned_indices(spec, inputs[0].shape[0], inputs[0].device)

    def check(self, spec, inputs, result, rows):
        """Its logits are never stored: the selection is checked against the float64 logits."""
        q, k, k_scale, w, ks, ke = inputs
        r = rows.to(q.device)
        ref = reference.indexer(q[r], k, k_scale, w[r], ks[r], ke[r])
        tol = IndexerOp.tolerances[f"logits.{spec.indexer.dtype}"]  # the indexer's bound on its logits
        assert_topk(result[r], ref, ks[r], ke[r], spec.topk.k, tolerance=tol)
        return f"top-k contract against float64 logits on {len(rows)} rows (tolerance {tol:g})"

    def naive(self, spec, inputs):
        return lambda: naive_topk(naive_indexer(*inputs), inputs[4], inputs[5], spec.topk.k)

    def shape_info(self, spec, S_, SKV_):
        ix = spec.indexer
        return {"S": S_, "SKV": SKV_, "H": ix.heads, "D": ix.head_dim, "dtype": ix.dtype, "window": "causal",
                "k": spec.topk.k}

    def bench_warning(self, spec, S_, SKV_):
        return few_keys_warning(spec, SKV_)

    def sizes(self, S_, SKV_):
        return {"S": S_, "SKV": SKV_, "W": causal_window_mean(S_, SKV_)}


register(IndexerTopKOp())
