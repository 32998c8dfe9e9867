"""Stage 3, sparse MLA attention (MQA form): each query's heads attend only to its selected kv
rows. out[t, h] = sum_i softmax_i(sm_scale * q[t, h] . kv[idx_i]) * kv[idx_i, :v_dim] over valid
idx_i (0 <= idx < SKV), lse in natural log; a row with no valid index gives out 0, lse +inf.
An optional max_logits [S, H] fp32 buffer (keyword, written in place) also receives each row's
largest scaled score sm_scale * q[t, h] . kv[idx_i] (-inf for a row with no valid index)."""
from __future__ import annotations

import math

import sympy as sp
import torch

from .. import reference
from ..verify import assert_close
from . import register
from .base import (SKV, TORCH_DTYPES, Call, Cost, Op, S, causal_topk_indices, check_out, check_tensor, generator,
                   next_pow2, softmax_scale, with_softmax_scale)


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


class SparseAttentionFamily(Op):
    """What the forward and the backward of sparse attention share: the fields their math reads
    (sm_scale is a run-time argument, not part of a kernel), module names, padded tile sizes and
    the symbols their schedules are written in."""
    backends = ("triton", "tvm")

    def semantic_fields(self, spec):
        at = spec.attention
        return {"heads": at.heads, "qk_dim": at.qk_dim, "v_dim": at.v_dim, "dtype": at.dtype, "topk": spec.topk.k}

    def module_stem(self, spec):
        at = spec.attention
        return f"{self.name}_h{at.heads}_dqk{at.qk_dim}_dv{at.v_dim}_{at.dtype}"

    @staticmethod
    def tile_dims(spec) -> dict[str, int]:
        """The Triton templates' padded V and rope widths (power-of-two tiles, at least 16)."""
        at = spec.attention
        return {"rope_dim": at.rope_dim, "dv_pad": next_pow2(at.v_dim, 16),
                "dr_pad": next_pow2(at.rope_dim, 16) if at.rope_dim else 16}

    def problem_symbols(self, spec):
        at = spec.attention
        return {"heads": at.heads, "heads_pad": next_pow2(at.heads), "dv_pad": next_pow2(at.v_dim, 16),
                "dr_pad": next_pow2(at.rope_dim, 16) if at.rope_dim else 0,
                "v_dim": at.v_dim, "rope_dim": at.rope_dim}


class SparseAttentionOp(SparseAttentionFamily):
    name = "sparse_attention"
    position = 30
    summary = "sparse MLA attention: out [S, H, v_dim] bf16 and natural-log lse [S, H] over the selected rows"
    stage = True
    outputs = ("out", "lse")
    short_names = {"block_h": "bh", "block_n": "n", "v_split": "vs", "num_warps": "w", "num_stages": "s",
                   "index_prefetch": "ip", "gluon": "gl"}
    naive_name = "gather + einsum + softmax (bf16, chunks of 256)"
    args = (("q", "Tensor"), ("kv", "Tensor"), ("indices", "Tensor"), ("sm_scale", "float"))
    # P and the output are rounded to bf16 (2**-8 relative each); the lse stays fp32
    tolerances = {"out": 1e-2, "lse": 1e-4}
    # gradients flow to q and kv through out; the lse is a statistic (the indexer loss reads it
    # detached), so it carries none
    backward_kernel = "sparse_attention_bwd"
    non_differentiable = ("lse",)

    def backward_args(self, inputs, outputs, grads):
        return (inputs["q"], inputs["kv"], inputs["indices"], outputs["out"], outputs["lse"], grads["out"],
                inputs["sm_scale"])

    def input_gradients(self, bwd_outputs):
        dq, dkv = bwd_outputs
        return {"q": dq, "kv": dkv}

    def derived(self, spec, point, backend):
        if backend != "triton":
            return {"rope_dim": spec.attention.rope_dim}
        tiles = self.tile_dims(spec)
        return tiles | {"dv_chunk": tiles["dv_pad"] // point["v_split"]}

    def cost(self, spec):
        at, k = spec.attention, spec.topk.k
        flops = 2 * S * at.heads * k * (at.qk_dim + at.v_dim)
        nbytes = (S * at.heads * at.qk_dim * 2  # q
                  + sp.Min(SKV, S * k) * at.qk_dim * 2  # each kv row at most once
                  + S * k * 4  # indices
                  + S * at.heads * at.v_dim * 2 + S * at.heads * 4)  # out, lse
        return Cost(self.name, flops, nbytes, "bf16")

    def check_args(self, spec, q, kv, indices, sm_scale=None, out=None, lse=None, max_logits=None):
        at = spec.attention
        dtype = TORCH_DTYPES[at.dtype]
        check_tensor("q", q, dtype, (None, at.heads, at.qk_dim))
        dev, n_q = q.device, q.shape[0]
        check_tensor("kv", kv, dtype, (None, at.qk_dim), dev)
        check_tensor("indices", indices, torch.int32, (n_q, spec.topk.k), dev)
        softmax_scale(spec, sm_scale)
        check_out("out", out, dtype, (n_q, at.heads, at.v_dim), dev)
        check_out("lse", lse, torch.float32, (n_q, at.heads), dev)
        check_out("max_logits", max_logits, torch.float32, (n_q, at.heads), dev)
        if kv.shape[0] >= 2**31 - 1:
            raise ValueError(f"kv has {kv.shape[0]} rows: int32 indices address at most 2**31 - 2")
        return Call(dev, n_q, kv.shape[0])

    def launch_args(self, spec, args, kwargs):
        return with_softmax_scale(spec, args, kwargs)

    def fake(self, spec, q, kv, indices, sm_scale):
        at = spec.attention
        return (q.new_empty((q.shape[0], at.heads, at.v_dim)),
                q.new_empty((q.shape[0], at.heads), dtype=torch.float32))

    def reference(self, spec, q, kv, indices, sm_scale=None):
        scale = softmax_scale(spec, sm_scale)
        return reference.sparse_attention(q, kv, indices, scale, spec.attention.v_dim)

    def inputs(self, spec, S_, SKV_, device, seed):
        """q, kv and, per query, k random distinct causal keys padded with the invalid index SKV;
        the spec's softmax scale."""
        at, k = spec.attention, spec.topk.k
        g = generator(device, seed)
        q = torch.randn(S_, at.heads, at.qk_dim, device=device, generator=g).bfloat16()
        kv = torch.randn(SKV_, at.qk_dim, device=device, generator=g).bfloat16()
        return (q, kv, causal_topk_indices(S_, SKV_, k, device, g), at.softmax_scale)

    def poisoned_outputs(self, spec, inputs):
        q = inputs[0]
        at = spec.attention
        return {"out": torch.full((q.shape[0], at.heads, at.v_dim), math.nan, dtype=q.dtype, device=q.device),
                "lse": torch.full((q.shape[0], at.heads), math.nan, device=q.device)}

    def check(self, spec, inputs, result, rows):
        q, kv, idx, sm_scale = inputs
        out, lse = result
        r = rows.to(q.device)
        ref_out, ref_lse = reference.sparse_attention(q[r], kv, idx[r], sm_scale, spec.attention.v_dim)
        r1 = assert_close("sparse_attention.out", out[r], ref_out, self.tolerance("out"))
        r2 = assert_close("sparse_attention.lse", lse[r], ref_lse, self.tolerance("lse"))
        return f"float64 reference on {len(rows)} rows, RMS ratio out {r1:.2e}, lse {r2:.2e}"

    def naive(self, spec, inputs):
        return lambda: naive_sparse_attention(*inputs, spec.attention.v_dim)

    def shape_info(self, spec, S_, SKV_):
        at = spec.attention
        return {"S": S_, "SKV": SKV_, "H": at.heads, "Dqk": at.qk_dim, "Dv": at.v_dim, "topk": spec.topk.k}


register(SparseAttentionOp())
