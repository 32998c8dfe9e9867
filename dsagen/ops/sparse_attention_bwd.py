"""Training, the backward of sparse MLA attention: the gradients of `sparse_attention`'s out with
respect to q and kv, from the forward's saved out and lse.

    q [S, H, Dqk] bf16, kv [SKV, Dqk] bf16, indices [S, k] int32, out [S, H, Dv] bf16,
    lse [S, H] fp32 (natural log), d_out [S, H, Dv] bf16, sm_scale -> (dq [S, H, Dqk] bf16,
    dkv [SKV, Dqk] bf16).

Delta[t, h] = d_out[t, h] . out[t, h]; P = exp(sm_scale * q . kv_i - lse) over valid i (0 <= idx <
SKV; 0 elsewhere and for a row whose lse is +inf); dP = d_out . kv_i[:Dv]; dS = P (dP - Delta).
dq[t, h] = sm_scale * sum_i dS kv_i; dkv[j] = sum over (t, i) with idx[t, i] == j of
sm_scale * sum_h dS q[t, h] (+ sum_h P d_out[t, h] in the first Dv columns). A duplicate index adds
twice (as the forward counts it twice); a kv row nobody selects gets exactly 0.

Triton: one program per (query token, block of heads) computes its dq in registers and scatters
its dkv tiles into an fp32 accumulator with atomic adds (the summation order then depends on the
order in which programs run), or, with the knob `deterministic_dkv` (what a deterministic build
forces), into an int64 fixed-point accumulator whose sums do not depend on that order; see the
template for the scale and its precision. TVM: the llvm (CPU) target only, deterministic by
construction (a query-major pass for dq, then a kv-major pass that sums each row's contributions
in a fixed order); its CUDA rendering is refused with a message naming the Triton backend.
"""
from __future__ import annotations

import math

import sympy as sp
import torch

from .. import reference
from ..verify import Mismatch, assert_close
from . import register
from .base import (SKV, TORCH_DTYPES, Call, Cost, S, check_out, check_tensor, generator, softmax_scale,
                   with_softmax_scale)
from .sparse_attention import SparseAttentionFamily, SparseAttentionOp

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


def backward_inputs(spec, q, kv, idx, sm_scale: float, seed: int) -> tuple:
    """The backward's arguments for given forward inputs: out and lse from the float64 reference
    forward (rounded as the forward kernel stores them), a random d_out."""
    out, lse = reference.sparse_attention(q, kv, idx, sm_scale, spec.attention.v_dim)
    g = generator(q.device, seed + 1)
    d_out = torch.randn(out.shape, device=q.device, generator=g).to(q.dtype)
    return (q, kv, idx, out.to(q.dtype), lse.float(), d_out, sm_scale)


class SparseAttentionBwdOp(SparseAttentionFamily):
    name = "sparse_attention_bwd"
    position = 110
    summary = "sparse MLA attention backward: dq [S, H, Dqk] and dkv [SKV, Dqk] bf16 from out, lse and d_out"
    stage = False
    outputs = ("dq", "dkv")
    short_names = {"block_h": "bh", "block_n": "n", "num_warps": "w", "num_stages": "s", "deterministic_dkv": "det"}
    naive_name = "gather + einsum formulas + index_add_ (bf16 products, chunks of 64)"
    args = (("q", "Tensor"), ("kv", "Tensor"), ("indices", "Tensor"), ("out", "Tensor"), ("lse", "Tensor"),
            ("d_out", "Tensor"), ("sm_scale", "float"))
    # gradients come from bf16 inputs through fp32 accumulators: dS = P (dP - Delta) cancels, so a
    # looser bound than the forward's
    tolerances = {"dq": 2e-2, "dkv": 2e-2}
    # the dkv sums are then independent of the order in which programs run (int64 fixed point)
    deterministic_knobs = {"deterministic_dkv": 1}

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

    def check_args(self, spec, q, kv, indices, out, lse, d_out, sm_scale=None, dq=None, dkv=None):
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
        if kv.shape[0] >= 2**31 - 1:
            raise ValueError(f"kv has {kv.shape[0]} rows: int32 indices address at most 2**31 - 2")
        return Call(dev, n_q, kv.shape[0])

    def launch_args(self, spec, args, kwargs):
        return with_softmax_scale(spec, args, kwargs, position=6)  # after the six tensors

    def fake(self, spec, q, kv, indices, out, lse, d_out, sm_scale):
        at = spec.attention
        return (q.new_empty((q.shape[0], at.heads, at.qk_dim)), kv.new_empty((kv.shape[0], at.qk_dim)))

    def reference(self, spec, q, kv, indices, out, lse, d_out, sm_scale=None):
        scale = softmax_scale(spec, sm_scale)
        return reference.sparse_attention_bwd(q, kv, indices, out, lse, d_out, scale, spec.attention.v_dim)

    def inputs(self, spec, S_, SKV_, device, seed):
        """The forward's workload (k distinct causal keys per query, padded with SKV), its float64
        reference out and lse, and a random d_out."""
        q, kv, idx, scale = SparseAttentionOp().inputs(spec, S_, SKV_, device, seed)
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
        q, kv, idx, out, lse, d_out, sm_scale = inputs
        dq, dkv = result
        v_dim = spec.attention.v_dim
        r = rows.to(q.device)
        if torch.isnan(dkv).any():
            raise Mismatch("sparse_attention_bwd.dkv: NaN values (unwritten or broken)")
        ref_dq, _ = reference.sparse_attention_bwd(q[r], kv, idx[r], out[r], lse[r], d_out[r], sm_scale, v_dim)
        r1 = assert_close("sparse_attention_bwd.dq", dq[r], ref_dq, self.tolerance("dq"))
        picked = checked_kv_rows(idx, kv.shape[0], r)
        keep = torch.isin(idx, picked)
        users = keep.any(1).nonzero().flatten()
        only = torch.where(keep, idx, -1)[users]
        _, ref_dkv = reference.sparse_attention_bwd(q[users], kv, only, out[users], lse[users], d_out[users],
                                                    sm_scale, v_dim)
        r2 = assert_close("sparse_attention_bwd.dkv", dkv[picked], ref_dkv[picked], self.tolerance("dkv"))
        unused = unselected_rows(idx, kv.shape[0])
        if (dkv[unused] != 0).any():
            raise Mismatch("sparse_attention_bwd.dkv: a kv row nobody selects is not 0")
        return (f"float64 reference: dq on {len(rows)} rows (RMS ratio {r1:.2e}), dkv on {len(picked)} selected "
                f"rows (RMS ratio {r2:.2e}) and {len(unused)} unselected ones (exactly 0)")

    def naive(self, spec, inputs):
        return lambda: naive_sparse_attention_bwd(*inputs, spec.attention.v_dim)

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


register(SparseAttentionBwdOp())
