"""Sparse attention's workload: per query, k random distinct causal keys padded with the invalid
index SKV, checked against the float64 reference (which also takes the optional attention sink and
top-k lengths); gather + einsum + softmax is the baseline."""
from __future__ import annotations

import math

import torch

from .. import reference
from ..verify import assert_close
from .checks import softmax_scale
from .workload import Workload, causal_topk_indices, generator


def naive_sparse_attention(q, kv, idx, sm_scale: float, v_dim: int, chunk: int = 256):
    """Gather the selected rows and do dense attention over them, in chunks of queries."""
    n_q, heads, _ = q.shape
    out = torch.empty(n_q, heads, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(n_q, heads, dtype=torch.float32, device=q.device)
    for s0 in range(0, n_q, chunk):
        ix = idx[s0:s0 + chunk].long()
        valid = (ix >= 0) & (ix < kv.shape[0])
        rows = kv[ix.clamp(0, kv.shape[0] - 1)]  # [c, k, D]
        scores = torch.einsum("chd,ckd->chk", q[s0:s0 + chunk], rows).float() * sm_scale
        scores = scores.masked_fill(~valid[:, None, :], -math.inf)
        lse[s0:s0 + chunk] = torch.logsumexp(scores, -1)
        p = torch.softmax(scores, -1).nan_to_num(0.0).to(q.dtype)
        out[s0:s0 + chunk] = torch.einsum("chk,ckd->chd", p, rows[..., :v_dim])
    return out, lse


def attention_inputs(spec, S_, SKV_, device, seed) -> tuple:
    """q, kv and, per query, k random distinct causal keys padded with the invalid index SKV;
    the spec's softmax scale."""
    at, k = spec.attention, spec.topk.k
    g = generator(device, seed)
    q = torch.randn(S_, at.heads, at.qk_dim, device=device, generator=g).bfloat16()
    kv = torch.randn(SKV_, at.qk_dim, device=device, generator=g).bfloat16()
    return (q, kv, causal_topk_indices(S_, SKV_, k, device, g), at.softmax_scale)


class SparseAttentionWorkload(Workload):
    kernel = "sparse_attention"
    naive_name = "gather + einsum + softmax (bf16, chunks of 256)"
    # P and the output are rounded to bf16 (2**-8 relative each); the lse stays fp32
    tolerances = {"out": 1e-2, "lse": 1e-4}

    def reference(self, spec, q, kv, indices, sm_scale=None, attn_sink=None, topk_length=None):
        scale = softmax_scale(spec, sm_scale)
        return reference.sparse_attention(q, kv, indices, scale, spec.attention.v_dim, attn_sink, topk_length)

    def inputs(self, spec, S_, SKV_, device, seed):
        """The plain attention's arguments: no sink, every index of a row read (no topk_length)."""
        return (*attention_inputs(spec, S_, SKV_, device, seed), None, None)

    def poisoned_outputs(self, spec, inputs):
        q = inputs[0]
        at = spec.attention
        return {"out": torch.full((q.shape[0], at.heads, at.v_dim), math.nan, dtype=q.dtype, device=q.device),
                "lse": torch.full((q.shape[0], at.heads), math.nan, device=q.device)}

    def check(self, spec, inputs, result, rows):
        q, kv, idx, sm_scale, attn_sink, topk_length = inputs
        out, lse = result
        r = rows.to(q.device)
        lengths = None if topk_length is None else topk_length[r]
        ref_out, ref_lse = reference.sparse_attention(q[r], kv, idx[r], sm_scale, spec.attention.v_dim, attn_sink,
                                                      lengths)
        r1 = assert_close("sparse_attention.out", out[r], ref_out, self.tolerance("out"))
        r2 = assert_close("sparse_attention.lse", lse[r], ref_lse, self.tolerance("lse"))
        return f"float64 reference on {len(rows)} rows, RMS ratio out {r1:.2e}, lse {r2:.2e}"

    def naive(self, spec, inputs):
        return lambda: naive_sparse_attention(*inputs[:4], spec.attention.v_dim)  # the inputs have no sink or lengths

    def shape_info(self, spec, S_, SKV_):
        at = spec.attention
        return {"S": S_, "SKV": SKV_, "H": at.heads, "Dqk": at.qk_dim, "Dv": at.v_dim, "topk": spec.topk.k}


WORKLOAD = SparseAttentionWorkload()
