"""The fused indexer + top-k's workload: the indexer's inputs; its logits are never stored, so the
selection is checked against the float64 logits within the indexer's bound."""
from __future__ import annotations

from .. import reference
from ..verify import assert_topk
from .indexer_workload import causal_sizes, indexer_inputs, naive_indexer
from .shared import INDEXER_LOGITS_TOLERANCES
from .topk_workload import naive_topk, poisoned_indices
from .workload import Workload, few_keys_warning


class IndexerTopKWorkload(Workload):
    kernel = "indexer_topk"
    naive_name = "bf16 einsum indexer, then torch.topk"
    tolerances = dict(INDEXER_LOGITS_TOLERANCES)  # the indexer's bound on the logits it selects by

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
        tol = self.tolerance(f"logits.{spec.indexer.dtype}")
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
        return causal_sizes(S_, SKV_)


WORKLOAD = IndexerTopKWorkload()
