"""The sparse attention backward's workload: the forward's workload, its float64 out and lse, and
a random d_out; dq is checked on sampled queries, dkv on the rows they select and on rows nobody
selects (exactly 0)."""
from __future__ import annotations

import math

import torch

from .. import reference
from ..verify import Mismatch, assert_close
from .checks import softmax_scale
from .sparse_attention_workload import attention_inputs
from .workload import Workload, generator

CHECKED_KV_ROWS = 64  # selected kv rows whose dkv a sampled check compares (plus unselected ones)


def naive_sparse_attention_bwd(q, kv, idx, out, lse, d_out, sm_scale: float, v_dim: int, chunk: int = 64):
    """Gather the selected rows and apply the formulas with einsums (bf16 products, fp32 softmax
    terms), in chunks of queries; dkv is summed with index_add_ in fp32."""
    n_q, _, qk_dim = q.shape
    skv = kv.shape[0]
    dq = torch.empty_like(q)
    dkv = torch.zeros(skv, qk_dim, dtype=torch.float32, device=q.device)
    for s0 in range(0, n_q, chunk):
        sl = slice(s0, s0 + chunk)
        ix = idx[sl].long()
        valid = (ix >= 0) & (ix < skv)
        rows = kv[ix.clamp(0, max(skv - 1, 0))]  # [c, k, D]
        do_c = d_out[sl]
        delta = (do_c.float() * out[sl].float()).sum(-1)  # [c, H]
        scores = torch.einsum("chd,ckd->chk", q[sl], rows).float() * sm_scale
        p = torch.exp(scores - lse[sl][..., None]).masked_fill(~valid[:, None, :], 0.0)
        dp = torch.einsum("chd,ckd->chk", do_c, rows[..., :v_dim]).float()
        ds = (sm_scale * p * (dp - delta[..., None])).to(q.dtype)
        dq[sl] = torch.einsum("chk,ckd->chd", ds, rows)
        contrib = torch.einsum("chk,chd->ckd", ds, q[sl]).float()
        contrib[..., :v_dim] += torch.einsum("chk,chd->ckd", p.to(q.dtype), do_c).float()
        dkv.index_add_(0, ix[valid], contrib[valid])
    return dq, dkv.to(q.dtype)


def sink_and_length_bwd(q, kv, indices, out, lse, d_out, sm_scale: float, v_dim: int, attn_sink=None,
                        topk_length=None):
    """The float64 backward with the forward's optional sink and lengths: slots past a row's length
    become invalid; the sink is a softmax logit without a value, so P is normalized by
    lse_s = log(exp(lse) + exp(sink)) (+inf where lse is), and dsink[h] = -sum_t (1 - sigma) Delta
    with 1 - sigma = 1 / (1 + exp(lse - sink)) (0 for a row with no valid index)."""
    if topk_length is not None:
        past = torch.arange(indices.shape[1], device=indices.device)[None, :] >= topk_length.long()[:, None]
        indices = indices.masked_fill(past, -1)
    if attn_sink is None:
        return reference.sparse_attention_bwd(q, kv, indices, out, lse, d_out, sm_scale, v_dim)
    lse64, sink64 = lse.double(), attn_sink.double()[None, :]
    no_valid = lse64 == math.inf
    lse_s = torch.where(no_valid, lse64, torch.logaddexp(lse64, sink64))
    dq, dkv = reference.sparse_attention_bwd(q, kv, indices, out, lse_s, d_out, sm_scale, v_dim)
    delta = (d_out.double() * out.double()).sum(-1)
    sink_weight = torch.where(no_valid, 0.0, torch.sigmoid(sink64 - lse64))
    return dq, dkv, -(sink_weight * delta).sum(0)


def backward_inputs(spec, q, kv, idx, sm_scale: float, seed: int) -> tuple:
    """The backward's arguments for given forward inputs: out and lse from the float64 reference
    forward (rounded as the forward kernel stores them), a random d_out; no sink, no lengths."""
    out, lse = reference.sparse_attention(q, kv, idx, sm_scale, spec.attention.v_dim)
    g = generator(q.device, seed + 1)
    d_out = torch.randn(out.shape, device=q.device, generator=g).to(q.dtype)
    return (q, kv, idx, out.to(q.dtype), lse.float(), d_out, sm_scale, None, None)


class SparseAttentionBwdWorkload(Workload):
    kernel = "sparse_attention_bwd"
    naive_name = "gather + einsum formulas + index_add_ (bf16 products, chunks of 64)"
    # gradients come from bf16 inputs through fp32 accumulators: dS = P (dP - Delta) cancels, so a
    # looser bound than the forward's
    tolerances = {"dq": 2e-2, "dkv": 2e-2, "dsink": 2e-2}

    def reference(self, spec, q, kv, indices, out, lse, d_out, sm_scale=None, attn_sink=None, topk_length=None):
        """(dq, dkv), and dsink where a sink is given."""
        scale = softmax_scale(spec, sm_scale)
        return sink_and_length_bwd(q, kv, indices, out, lse, d_out, scale, spec.attention.v_dim, attn_sink,
                                   topk_length)

    def inputs(self, spec, S_, SKV_, device, seed):
        """The forward's workload (k distinct causal keys per query, padded with SKV), its float64
        reference out and lse, and a random d_out."""
        q, kv, idx, scale = attention_inputs(spec, S_, SKV_, device, seed)
        return backward_inputs(spec, q, kv, idx, scale, seed)

    def poisoned_outputs(self, spec, inputs):
        q, kv = inputs[0], inputs[1]
        at = spec.attention
        return {"dq": torch.full((q.shape[0], at.heads, at.qk_dim), math.nan, dtype=q.dtype, device=q.device),
                "dkv": torch.full((kv.shape[0], at.qk_dim), math.nan, dtype=kv.dtype, device=kv.device)}

    def check(self, spec, inputs, result, rows):
        """dq on the sampled queries; dkv on up to CHECKED_KV_ROWS rows they select, against a
        reference fed every (query, slot) of the whole batch that selects one of those rows (dkv
        of a row depends on nothing else: P uses the saved lse), and on rows nobody selects (0)."""
        q, kv, idx, out, lse, d_out, sm_scale, sink, lengths = (*inputs, None, None)[:9]
        dq, dkv = result
        v_dim = spec.attention.v_dim
        r = rows.to(q.device)
        if torch.isnan(dkv).any():
            raise Mismatch("sparse_attention_bwd.dkv: NaN values (unwritten or broken)")
        if lengths is not None:  # slots past a row's length select nothing
            idx = idx.masked_fill(torch.arange(idx.shape[1], device=idx.device)[None, :] >= lengths[:, None], -1)

        def ref(sel, indices):
            return sink_and_length_bwd(q[sel], kv, indices, out[sel], lse[sel], d_out[sel], sm_scale, v_dim, sink)

        ref_dq = ref(r, idx[r])[0]
        r1 = assert_close("sparse_attention_bwd.dq", dq[r], ref_dq, self.tolerance("dq"))
        picked = checked_kv_rows(idx, kv.shape[0], r)
        keep = torch.isin(idx, picked)
        users = keep.any(1).nonzero().flatten()
        only = torch.where(keep, idx, -1)[users]
        ref_dkv = ref(users, only)[1]
        r2 = assert_close("sparse_attention_bwd.dkv", dkv[picked], ref_dkv[picked], self.tolerance("dkv"))
        unused = unselected_rows(idx, kv.shape[0])
        if (dkv[unused] != 0).any():
            raise Mismatch("sparse_attention_bwd.dkv: a kv row nobody selects is not 0")
        return (f"float64 reference: dq on {len(rows)} rows (RMS ratio {r1:.2e}), dkv on {len(picked)} selected "
                f"rows (RMS ratio {r2:.2e}) and {len(unused)} unselected ones (exactly 0)")

    def naive(self, spec, inputs):
        return lambda: naive_sparse_attention_bwd(*inputs[:7], spec.attention.v_dim)

    def shape_info(self, spec, S_, SKV_):
        at = spec.attention
        return {"S": S_, "SKV": SKV_, "H": at.heads, "Dqk": at.qk_dim, "Dv": at.v_dim, "topk": spec.topk.k}


def checked_kv_rows(idx: torch.Tensor, skv: int, rows: torch.Tensor) -> torch.Tensor:
    """Up to CHECKED_KV_ROWS distinct valid kv rows selected by the query rows `rows`, evenly
    spread over their sorted set (first and last included)."""
    sel = idx[rows].long().flatten()
    sel = torch.unique(sel[(sel >= 0) & (sel < skv)])
    if sel.numel() <= CHECKED_KV_ROWS:
        return sel
    at = torch.linspace(0, sel.numel() - 1, CHECKED_KV_ROWS, device=sel.device).round().long()
    return sel[at]


def unselected_rows(idx: torch.Tensor, skv: int, n: int = 16) -> torch.Tensor:
    """Up to n kv rows that no query selects (their dkv must be exactly 0)."""
    flat = idx.long().flatten()
    flat = flat[(flat >= 0) & (flat < skv)]
    used = torch.zeros(skv, dtype=torch.bool, device=idx.device)
    used[flat] = True
    return (~used).nonzero().flatten()[:n]


WORKLOAD = SparseAttentionBwdWorkload()
