"""Training, the backward of sparse MLA attention: the gradients of `sparse_attention`'s out with
respect to q, kv and (where the forward had one) the attention sink, from the forward's saved out
and lse.

    q [S, H, Dqk] bf16, kv [SKV, Dqk] bf16, indices [S, k] int32, out [S, H, Dv] bf16,
    lse [S, H] fp32 (natural log), d_out [S, H, Dv] bf16, sm_scale, attn_sink [H] fp32 or None,
    topk_length [S] int32 or None -> (dq [S, H, Dqk] bf16, dkv [SKV, Dqk] bf16); with a dsink
    buffer ([H] fp32, by keyword) also the sink's gradient.

Delta[t, h] = d_out[t, h] . out[t, h]; P = exp(sm_scale * q . kv_i - lse) over valid i (0 <= idx <
SKV; 0 elsewhere and for a row whose lse is +inf); dP = d_out . kv_i[:Dv]; dS = P (dP - Delta).
dq[t, h] = sm_scale * sum_i dS kv_i; dkv[j] = sum over (t, i) with idx[t, i] == j of
sm_scale * sum_h dS q[t, h] (+ sum_h P d_out[t, h] in the first Dv columns). A duplicate index adds
twice (as the forward counts it twice); a kv row nobody selects gets exactly 0.

The sink is one more softmax logit with no value row: out = sigma * o' with sigma =
1 / (1 + exp(sink - lse)), so sigma * exp(s_i - lse) = exp(s_i - lse_s), lse_s = logaddexp(lse,
sink). The formulas above with lse_s in place of lse (Delta still d_out . out, the saved out being
the scaled one) are then the exact gradients, and the sink's is that of its logit:
dsink[h] = -sum_t (1 - sigma[t, h]) Delta[t, h]. topk_length[t] keeps row t's first
topk_length[t] slots (later ones are invalid; <= 0: none; > k: all).

Triton: one program per (query token, block of heads) computes its dq in registers and scatters
its dkv tiles into an fp32 accumulator with atomic adds (the summation order then depends on the
order in which programs run), or, with the knob `deterministic_dkv` (what a deterministic build
forces), into an int64 fixed-point accumulator whose sums do not depend on that order; see the
template for the scale and its precision. The small Delta kernel also computes lse_s and each
(token, head)'s dsink term; dsink sums those over tokens in a fixed order. TVM: the llvm (CPU)
target only, deterministic by construction (a query-major pass for dq, then a kv-major pass that
sums each row's contributions in a fixed order); its CUDA rendering is refused with a message
naming the Triton backend.
"""
from __future__ import annotations

import sympy as sp
import torch

from ..plan import SKV, Cost, S
from .base import Call, Tuning
from .checks import check_out, check_tensor, softmax_scale
from .shared import SM_SCALE, TORCH_DTYPES
from .signature import Signature, tensor
from .sparse_attention import ATTN_SINK, TOPK_LENGTH, SparseAttentionFamily


class SparseAttentionBwdOp(SparseAttentionFamily):
    name = "sparse_attention_bwd"
    position = 110
    summary = "sparse MLA attention backward: dq [S, H, Dqk] and dkv [SKV, Dqk] bf16 from out, lse and d_out"
    doc = ("(dq [S, H, Dqk] bf16, dkv [SKV, Dqk] bf16): the gradients of sparse_attention's out with respect\n"
           "to q and kv, from its saved out and lse and the incoming d_out. sm_scale: None uses the spec's.\n"
           "attn_sink [H] fp32 and topk_length [S] int32: the forward's (None: none). dsink: an optional\n"
           "[H] fp32 buffer (with attn_sink) that receives the sink's gradient, written in place.")
    short_names = {"block_h": "bh", "block_n": "n", "num_warps": "w", "num_stages": "s", "deterministic_dkv": "det"}
    # dsink is an extra output: a caller without a sink (or not training it) keeps the two results
    signature = Signature((tensor("q"), tensor("kv"), tensor("indices"), tensor("out"), tensor("lse"),
                           tensor("d_out"), SM_SCALE, ATTN_SINK, TOPK_LENGTH),
                          returns=("dq", "dkv"), extra_outputs=("dsink",))
    # the dkv sums are then independent of the order in which programs run (int64 fixed point)
    tuning = Tuning(deterministic_knobs={"deterministic_dkv": 1})

    def unavailable(self, spec, backend):
        return super().unavailable(spec, backend) or (
            None if spec.attention.dtype == "bf16" else
            f"{self.name} needs bf16 attention (attention.dtype is {spec.attention.dtype})")

    def derived(self, spec, point, backend):
        return self.tile_dims(spec)

    def cost(self, spec):
        at, k = spec.attention, spec.topk.k
        # five matmuls per (query, head, selected row): QK^T and dP over (Dqk, Dv), then dq, dK and
        # dV over (Dqk, Dqk, Dv): 2 S H k (2 Dqk + 2 Dv + Dqk). TileLang's sparse_mla_bwd example
        # counts its FLOPs the same way, so the rates compare directly.
        flops = 2 * S * at.heads * k * (2 * at.qk_dim + 2 * at.v_dim + at.qk_dim)
        nbytes = (S * at.heads * at.qk_dim * 2  # q
                  + sp.Min(SKV, S * k) * at.qk_dim * 2  # each selected kv row at most once
                  + S * k * 4  # indices
                  + 2 * S * at.heads * at.v_dim * 2 + S * at.heads * 4  # out, d_out, lse
                  + S * at.heads * at.qk_dim * 2 + SKV * at.qk_dim * 2)  # dq, dkv written once
        return Cost(self.name, flops, nbytes, "bf16")

    def check_args(self, spec, q, kv, indices, out, lse, d_out, sm_scale=None, attn_sink=None, topk_length=None,
                   dq=None, dkv=None, dsink=None):
        at = spec.attention
        dtype = TORCH_DTYPES[at.dtype]
        check_tensor("q", q, dtype, (None, at.heads, at.qk_dim))
        dev, n_q = q.device, q.shape[0]
        check_tensor("kv", kv, dtype, (None, at.qk_dim), dev)
        check_tensor("indices", indices, torch.int32, (n_q, spec.topk.k), dev)
        check_tensor("out", out, dtype, (n_q, at.heads, at.v_dim), dev)
        check_tensor("lse", lse, torch.float32, (n_q, at.heads), dev)
        check_tensor("d_out", d_out, dtype, (n_q, at.heads, at.v_dim), dev)
        softmax_scale(spec, sm_scale)
        check_out("dq", dq, dtype, (n_q, at.heads, at.qk_dim), dev)
        check_out("dkv", dkv, dtype, (kv.shape[0], at.qk_dim), dev)
        if attn_sink is not None:
            check_tensor("attn_sink", attn_sink, torch.float32, (at.heads,), dev)
        if topk_length is not None:
            check_tensor("topk_length", topk_length, torch.int32, (n_q,), dev)
        check_out("dsink", dsink, torch.float32, (at.heads,), dev)
        if dsink is not None and attn_sink is None:
            raise ValueError("dsink is the gradient of attn_sink: pass attn_sink too, or leave dsink out")
        if kv.shape[0] >= 2**31 - 1:
            raise ValueError(f"kv has {kv.shape[0]} rows: int32 indices address at most 2**31 - 2")
        return Call(dev, n_q, kv.shape[0])

    def fake(self, spec, q, kv, indices, out, lse, d_out, sm_scale, attn_sink=None, topk_length=None):
        at = spec.attention
        return (q.new_empty((q.shape[0], at.heads, at.qk_dim)), kv.new_empty((kv.shape[0], at.qk_dim)))


SPARSE_ATTENTION_BWD = SparseAttentionBwdOp()
