"""The indexer loss backward's workload: the forward's inputs, its float64 index_lse and a random
d_loss; d_iq and d_weights are checked on sampled rows, d_ik (a scatter over every row) on every key."""
from __future__ import annotations

import math

import torch

from .. import reference
from ..verify import assert_close
from .checks import softmax_scale
from .indexer_loss_workload import IndexerLossFamilyWorkload, loss_inputs, naive_loss_terms


def naive_indexer_loss_bwd(iq, ik, weights, aq, akv, alse, indices, sm_scale, index_lse, d_loss, chunk: int = 256):
    """(d_iq, d_ik, d_weights) with gather + einsum in fp32 (chunks of queries, index_add_ scatter)."""
    d_iq = torch.zeros(iq.shape, dtype=torch.float32, device=iq.device)
    d_ik = torch.zeros(ik.shape, dtype=torch.float32, device=iq.device)
    d_w = torch.zeros(weights.shape, dtype=torch.float32, device=iq.device)
    for sl, valid, safe, k_rows, scores, logits, p, defined in naive_loss_terms(
            iq, ik, weights, aq, akv, alse, indices, sm_scale, chunk):
        sm = torch.exp(logits - index_lse[sl, None])
        d_logits = torch.where(valid & defined[:, None], d_loss[sl, None] * (sm - p), 0.0)
        d_w[sl] = torch.einsum("cjk,ck->cj", scores.relu(), d_logits)
        g = weights[sl, :, None] * (scores > 0) * d_logits[:, None, :]  # [c, Hi, k]
        d_iq[sl] = torch.einsum("cjk,ckd->cjd", g, k_rows)
        contrib = torch.einsum("cjk,cjd->ckd", g, iq[sl].float())
        d_ik.index_add_(0, safe.reshape(-1), contrib.reshape(-1, ik.shape[1]))
    return d_iq.bfloat16(), d_ik.bfloat16(), d_w


class IndexerLossBwdWorkload(IndexerLossFamilyWorkload):
    kernel = "indexer_loss_bwd"
    naive_name = "gather + einsum + index_add_ (fp32, chunks of 256)"

    def reference(self, spec, iq, ik, weights, aq, akv, alse, indices, sm_scale=None, index_lse=None, d_loss=None):
        scale = softmax_scale(spec, sm_scale)
        return reference.indexer_loss_bwd(iq, ik, weights, aq, akv, alse, indices, scale, index_lse, d_loss)

    def inputs(self, spec, S_, SKV_, device, seed):
        """The forward's inputs, its index_lse from the float64 reference, and a random d_loss."""
        fwd = loss_inputs(spec, S_, SKV_, device, seed)
        _, lse = reference.indexer_loss(*fwd)
        g = torch.Generator(device=device).manual_seed(seed + 1)
        d_loss = torch.rand(S_, device=device, generator=g) + 0.5
        return fwd + (lse.float(), d_loss)

    def poisoned_outputs(self, spec, inputs):
        iq, ik, w = inputs[0], inputs[1], inputs[2]
        return {"d_iq": torch.full(iq.shape, math.nan, dtype=iq.dtype, device=iq.device),
                "d_ik": torch.full(ik.shape, math.nan, dtype=ik.dtype, device=ik.device),
                "d_weights": torch.full(w.shape, -7.0, device=w.device)}

    def check(self, spec, inputs, result, rows):
        """d_iq and d_weights on the sampled rows; d_ik (a scatter over every row) on every key."""
        d_iq, d_ik, d_w = result
        iq, ik, w, aq, akv, alse, idx, scale, lse, d_loss = inputs
        r = rows.to(iq.device)
        ref_q, _, ref_w = reference.indexer_loss_bwd(iq[r], ik, w[r], aq[r], akv, alse[r], idx[r], scale, lse[r],
                                                     d_loss[r])
        _, ref_k, _ = reference.indexer_loss_bwd(*inputs)
        r1 = assert_close("indexer_loss_bwd.d_iq", d_iq[r], ref_q, self.tolerance("dq"))
        r2 = assert_close("indexer_loss_bwd.d_ik", d_ik, ref_k, self.tolerance("dk"))
        r3 = assert_close("indexer_loss_bwd.d_weights", d_w[r], ref_w, self.tolerance("dweights"))
        return (f"float64 reference on {len(rows)} rows (d_ik on every key), RMS ratio d_iq {r1:.2e}, "
                f"d_ik {r2:.2e}, d_weights {r3:.2e}")

    def naive(self, spec, inputs):
        return lambda: naive_indexer_loss_bwd(*inputs)


WORKLOAD = IndexerLossBwdWorkload()
