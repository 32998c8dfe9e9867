"""The indexer loss's workload (shared with its backward's): a bf16 indexer and the attention whose
distribution it learns at (S, SKV), checked against the float64 loss; gather + einsum in fp32 is
the baseline."""
from __future__ import annotations

import math

import torch

from .. import reference
from ..verify import assert_close
from .checks import softmax_scale
from .workload import Workload, causal_topk_indices, generator


def attention_lse(aq, akv, indices, sm_scale: float, chunk: int = 64) -> torch.Tensor:
    """The attention forward's lse [S, H] fp32 over each row's valid indices, computed in float64
    (the reference's math, chunked over queries and vectorized): +inf for a row with none."""
    n_kv = akv.shape[0]
    lse = torch.empty(aq.shape[:2], dtype=torch.float32, device=aq.device)
    kv64 = akv.double()
    for s0 in range(0, aq.shape[0], chunk):
        ix = indices[s0:s0 + chunk].long()
        valid = (ix >= 0) & (ix < n_kv)
        rows = kv64[ix.clamp(0, max(n_kv - 1, 0))] if n_kv else kv64.new_zeros(*ix.shape, akv.shape[1])
        scores = torch.einsum("chd,ckd->chk", aq[s0:s0 + chunk].double(), rows) * sm_scale
        scores = scores.masked_fill(~valid[:, None, :], -math.inf)
        out = torch.logsumexp(scores, -1)
        lse[s0:s0 + chunk] = torch.where(valid.any(-1)[:, None], out, math.inf).float()
    return lse


def loss_inputs(spec, S_: int, SKV_: int, device, seed: int) -> tuple:
    """(iq, ik, weights, aq, akv, alse, indices, sm_scale): random bf16 indexer and attention
    inputs at scales that give logits of order 1, causal random top-k indices, and the attention's
    lse from the float64 forward."""
    ix, at = spec.indexer, spec.attention
    g = generator(device, seed)
    iq = torch.randn(S_, ix.heads, ix.head_dim, device=device, generator=g).bfloat16()
    ik = torch.randn(SKV_, ix.head_dim, device=device, generator=g).bfloat16()
    w = torch.randn(S_, ix.heads, device=device, generator=g) / (ix.heads * ix.head_dim) ** 0.5
    aq = torch.randn(S_, at.heads, at.qk_dim, device=device, generator=g).bfloat16()
    akv = torch.randn(SKV_, at.qk_dim, device=device, generator=g).bfloat16()
    idx = causal_topk_indices(S_, SKV_, spec.topk.k, device, g)
    scale = at.softmax_scale
    return (iq, ik, w, aq, akv, attention_lse(aq, akv, idx, scale), idx, scale)


# -- naive PyTorch ---------------------------------------------------------------------------------------------

def naive_loss_terms(iq, ik, weights, aq, akv, alse, indices, sm_scale, chunk: int = 256):
    """Per chunk of queries (gather + einsum, fp32): yields (rows, valid, rows of ik, per-head
    indexer scores, logits, target p, the row's defined flag) for the naive forward and backward."""
    n_kv = ik.shape[0]
    for s0 in range(0, iq.shape[0], chunk):
        sl = slice(s0, s0 + chunk)
        ix = indices[sl].long()
        valid = (ix >= 0) & (ix < n_kv)
        safe = ix.clamp(0, max(n_kv - 1, 0))
        k_rows = ik[safe].float()  # [c, k, Di]
        scores = torch.einsum("cjd,ckd->cjk", iq[sl].float(), k_rows)
        logits = torch.einsum("cjk,cj->ck", scores.relu(), weights[sl]).masked_fill(~valid, -math.inf)
        att = torch.einsum("chd,ckd->chk", aq[sl].float(), akv[safe].float()) * sm_scale
        mass = torch.exp(att - alse[sl, :, None]).sum(1).masked_fill(~valid, 0.0)
        total = mass.sum(-1, keepdim=True)
        defined = total[:, 0] > 0
        p = mass / torch.where(defined[:, None], total, 1.0)
        yield sl, valid, safe, k_rows, scores, logits, p, defined


def naive_indexer_loss(iq, ik, weights, aq, akv, alse, indices, sm_scale, chunk: int = 256):
    """(loss [S], index_lse [S]) with gather + einsum in fp32, chunks of queries."""
    loss = torch.zeros(iq.shape[0], dtype=torch.float32, device=iq.device)
    lse = torch.full((iq.shape[0],), math.inf, dtype=torch.float32, device=iq.device)
    for sl, valid, _, _, _, logits, p, defined in naive_loss_terms(iq, ik, weights, aq, akv, alse, indices,
                                                                     sm_scale, chunk):
        row_lse = torch.logsumexp(logits, -1)
        has = valid.any(-1)
        lse[sl] = torch.where(has, row_lse, math.inf)
        logsm = (logits - row_lse[:, None]).masked_fill(~valid, 0.0)
        plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
        loss[sl] = torch.where(defined, (plogp - p * logsm).sum(-1), 0.0)
    return loss, lse


class IndexerLossFamilyWorkload(Workload):
    """What the loss's workload and its backward's share: the shape reported and the bounds."""
    # the loss (and its index_lse) is an fp32 sum; the gradients of q, k and the weights come from
    # bf16 inputs through fp32 accumulators, so a looser bound (the sparse attention backward's)
    tolerances = {"loss": 1e-3, "dq": 2e-2, "dk": 2e-2, "dweights": 2e-2}

    def shape_info(self, spec, S_, SKV_):
        ix, at = spec.indexer, spec.attention
        return {"S": S_, "SKV": SKV_, "Hi": ix.heads, "Di": ix.head_dim, "H": at.heads, "Dqk": at.qk_dim,
                "topk": spec.topk.k}


class IndexerLossWorkload(IndexerLossFamilyWorkload):
    kernel = "indexer_loss"
    naive_name = "gather + einsum (fp32, chunks of 256)"

    def reference(self, spec, iq, ik, weights, aq, akv, alse, indices, sm_scale=None):
        scale = softmax_scale(spec, sm_scale)
        return reference.indexer_loss(iq, ik, weights, aq, akv, alse, indices, scale)

    def inputs(self, spec, S_, SKV_, device, seed):
        return loss_inputs(spec, S_, SKV_, device, seed)

    def poisoned_outputs(self, spec, inputs):
        n, dev = inputs[0].shape[0], inputs[0].device
        return {"loss": torch.full((n,), math.nan, device=dev), "index_lse": torch.full((n,), -7.0, device=dev)}

    def check(self, spec, inputs, result, rows):
        iq, ik, w, aq, akv, alse, idx, scale = inputs
        loss, lse = result
        r = rows.to(iq.device)
        ref_loss, ref_lse = reference.indexer_loss(iq[r], ik, w[r], aq[r], akv, alse[r], idx[r], scale)
        r1 = assert_close("indexer_loss.loss", loss[r], ref_loss, self.tolerance("loss"))
        r2 = assert_close("indexer_loss.index_lse", lse[r], ref_lse, self.tolerance("loss"))
        return f"float64 reference on {len(rows)} rows, RMS ratio loss {r1:.2e}, index_lse {r2:.2e}"

    def naive(self, spec, inputs):
        return lambda: naive_indexer_loss(*inputs)


WORKLOAD = IndexerLossWorkload()
