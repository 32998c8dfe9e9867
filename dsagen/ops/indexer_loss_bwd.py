"""The backward of the indexer training loss (dsagen/ops/indexer_loss.py): gradients of the loss
with respect to the indexer's inputs iq, ik and weights, given d_loss = dL/dloss [S].

  dI[t, s]     = d_loss[t] * (softmax_{S_t}(I[t])[s] - p[t, s])        (s in S_t)
  d_weights    = sum_s dI relu(iq . ik)
  d_iq[t, j]   = sum_s dI[t, s] w[t, j] 1[iq[t, j] . ik[s] > 0] ik[s]
  d_ik[s]      = sum over the queries t selecting s of sum_j dI[t, s] w[t, j] 1[...] iq[t, j]
The softmax uses the forward's index_lse; the target p is recomputed (a first pass over the row's
keys finds the attention mass's sum) and is detached. d_ik is accumulated in fp32 and rounded to
bf16 once; rows nobody selected are exactly 0.
Determinism: d_iq and d_weights are bitwise reproducible on both backends. d_ik is too on TVM's CPU
kernel (a fixed summation order per key block) and under the Triton interpreter, but not on a GPU:
the Triton kernel scatters d_ik by fp32 atomic adds whose order varies (seen on an H200: last-bit
differences, 7.6e-6 at most, between two runs).
"""
from __future__ import annotations

import math

import torch

from .. import reference
from ..verify import assert_close
from . import register
from .base import Call, Cost, S, SKV, check_out, check_tensor, softmax_scale, with_softmax_scale
from .indexer_loss import IndexerLossFamily, check_loss_inputs, input_bytes, loss_inputs, naive_loss_terms


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


class IndexerLossBwdOp(IndexerLossFamily):
    name = "indexer_loss_bwd"
    position = 100
    summary = ("indexer training loss backward: d_iq, d_ik (fp32 scatter, bf16 out) and d_weights from d_loss "
               "(bf16 indexer)")
    outputs = ("d_iq", "d_ik", "d_weights")
    naive_name = "gather + einsum + index_add_ (fp32, chunks of 256)"
    args = (("iq", "Tensor"), ("ik", "Tensor"), ("weights", "Tensor"), ("aq", "Tensor"), ("akv", "Tensor"),
            ("alse", "Tensor"), ("indices", "Tensor"), ("sm_scale", "float"), ("index_lse", "Tensor"),
            ("d_loss", "Tensor"))

    def cost(self, spec):
        """Two passes of attention scores (the mass's sum, then p), one of indexer scores and two
        gradient products of the indexer's size (d_iq, d_ik)."""
        ix, at, k = spec.indexer, spec.attention, spec.topk.k
        flops = 2 * S * k * (2 * at.heads * at.qk_dim + 3 * ix.heads * ix.head_dim)
        nbytes = (input_bytes(spec) + S * 8  # + index_lse, d_loss
                  + S * ix.heads * ix.head_dim * 2 + SKV * ix.head_dim * 2 + S * ix.heads * 4)  # grads
        return Cost(self.name, flops, nbytes, "bf16")

    def check_args(self, spec, iq, ik, weights, aq, akv, alse, indices, sm_scale=None, index_lse=None,
                   d_loss=None, d_iq=None, d_ik=None, d_weights=None):
        dev, n_q, n_kv = check_loss_inputs(spec, self.name, iq, ik, weights, aq, akv, alse, indices, sm_scale)
        check_tensor("index_lse", index_lse, torch.float32, (n_q,), dev)
        check_tensor("d_loss", d_loss, torch.float32, (n_q,), dev)
        check_out("d_iq", d_iq, torch.bfloat16, tuple(iq.shape), dev)
        check_out("d_ik", d_ik, torch.bfloat16, tuple(ik.shape), dev)
        check_out("d_weights", d_weights, torch.float32, tuple(weights.shape), dev)
        return Call(dev, n_q, n_kv)

    def launch_args(self, spec, args, kwargs):
        return with_softmax_scale(spec, args, kwargs, position=7)  # after the seven tensors

    def fake(self, spec, iq, ik, weights, aq, akv, alse, indices, sm_scale, index_lse, d_loss):
        return iq.new_empty(iq.shape), ik.new_empty(ik.shape), weights.new_empty(weights.shape)

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


register(IndexerLossBwdOp())
