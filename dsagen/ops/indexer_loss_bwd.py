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

import torch

from ..plan import SKV, Cost, S
from .base import Call
from .checks import check_out, check_tensor
from .indexer_loss import LOSS_ARGS, IndexerLossFamily, check_loss_inputs, input_bytes
from .signature import Arg, Signature


class IndexerLossBwdOp(IndexerLossFamily):
    name = "indexer_loss_bwd"
    position = 100
    summary = ("indexer training loss backward: d_iq, d_ik (fp32 scatter, bf16 out) and d_weights from d_loss "
               "(bf16 indexer)")
    doc = ("(d_iq, d_ik, d_weights): the gradients of indexer_loss's loss with respect to iq, ik and\n"
           "weights, from its saved index_lse and the incoming d_loss. sm_scale: None uses the spec's.")
    # index_lse and d_loss follow sm_scale, which has a default, so they default to None in Python
    # too; check_args requires them
    signature = Signature(LOSS_ARGS + (Arg("index_lse", default=None), Arg("d_loss", default=None)),
                          returns=("d_iq", "d_ik", "d_weights"))

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

    def fake(self, spec, iq, ik, weights, aq, akv, alse, indices, sm_scale, index_lse, d_loss):
        return iq.new_empty(iq.shape), ik.new_empty(ik.shape), weights.new_empty(weights.shape)


INDEXER_LOSS_BWD = IndexerLossBwdOp()
