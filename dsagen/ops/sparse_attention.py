"""Stage 3, sparse MLA attention (MQA form): each query's heads attend only to its selected kv
rows. out[t, h] = sum_i softmax_i(sm_scale * q[t, h] . kv[idx_i]) * kv[idx_i, :v_dim] over valid
idx_i (0 <= idx < SKV), lse in natural log; a row with no valid index gives out 0, lse +inf.
An optional max_logits [S, H] fp32 output (a buffer given by keyword, written in place) also
receives each row's largest scaled score sm_scale * q[t, h] . kv[idx_i] (-inf for a row with no
valid index).

Two optional inputs (DeepSeek-V4), applied inside the kernels:
- attn_sink [H] fp32: a per-head sink logit that takes its share of the softmax mass without a
  value, out[t, h] *= 1 / (1 + exp(attn_sink[h] - lse[t, h])), lse unchanged (-inf: no effect,
  +inf: out 0, NaN: out NaN; a row with no valid index keeps out 0 whatever the sink);
- topk_length [S] int32: row t reads only its first topk_length[t] indices (the rest count as
  invalid; <= 0: none, > k: all k)."""
from __future__ import annotations

import sympy as sp
import torch

from ..plan import SKV, Cost, S, next_pow2
from .base import Call, Gradient, Op, Variant
from .checks import check_out, check_tensor, softmax_scale
from .shared import SM_SCALE, TORCH_DTYPES
from .signature import Arg, Signature, tensor

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


# the forward's Triton algorithms: the tl kernel (any GPU, and the interpreter), the warp-specialized
# Gluon kernel and its split form (wgmma and setmaxnreg: sm_90 only, never interpreted)
TL = Variant("tl", "sparse_attention", "sparse_attention")
GLUON = Variant("gluon", "sparse_attention_gluon", "sparse_attention_gluon",
                min_capability=(9, 0), max_capability=(9, 0), interpreter=False)
GLUON_SPLIT = Variant("gluon_split", "sparse_attention_gluon_split", "sparse_attention_gluon_split",
                      min_capability=(9, 0), max_capability=(9, 0), interpreter=False)
# DeepSeek-V4's optional inputs: per-head sink logits and per-row counts of the indices to read
ATTN_SINK = Arg("attn_sink", "Tensor?", default=None)
TOPK_LENGTH = Arg("topk_length", "Tensor?", default=None)
# the knob that chose the algorithm before each had its own template (0, 1, 2), and the knobs the
# Gluon kernels tune (the others were pinned to the values their templates now write out)
LEGACY_ALGORITHM_KNOB = "gluon"
GLUON_KNOBS = ("block_n", "num_stages")


def attention_backward_args(inputs, outputs, grads):
    """sparse_attention_bwd's arguments in order; with a sink, by name with the output buffers, so
    that its extra output dsink (the sink's gradient) is written too."""
    q, kv, sink = inputs["q"], inputs["kv"], inputs["attn_sink"]
    args = {"q": q, "kv": kv, "indices": inputs["indices"], "out": outputs["out"], "lse": outputs["lse"],
            "d_out": grads["out"], "sm_scale": inputs["sm_scale"], "attn_sink": sink,
            "topk_length": inputs["topk_length"]}
    if sink is None:
        return tuple(args.values())
    return args | {"dq": q.new_empty(q.shape), "dkv": kv.new_empty(kv.shape), "dsink": sink.new_empty(sink.shape)}


def attention_input_gradients(bwd_outputs) -> dict:
    """dq and dkv, and dsink where the forward had a sink (topk_length carries none)."""
    dq, dkv, *dsink = bwd_outputs
    return {"q": dq, "kv": dkv} | ({"attn_sink": dsink[0]} if dsink else {})


class SparseAttentionOp(SparseAttentionFamily):
    name = "sparse_attention"
    position = 30
    summary = "sparse MLA attention: out [S, H, v_dim] bf16 and natural-log lse [S, H] over the selected rows"
    doc = ("(out [S, H, Dv] bf16, lse [S, H] fp32): softmax over each query's valid selected kv rows.\n"
           "sm_scale: None uses the spec's. Differentiable: out carries gradients to q and kv (the\n"
           "sparse_attention_bwd kernel); lse carries none. max_logits: an optional [S, H] fp32 buffer\n"
           "that also receives each row's largest scaled score (-inf where no index is valid).\n"
           "attn_sink: optional [H] fp32 sink logits, out *= 1 / (1 + exp(attn_sink[h] - lse)), lse\n"
           "unchanged. topk_length: optional [S] int32, row t reads only its first topk_length[t]\n"
           "indices (<= 0: none, > k: all).")
    stage = True
    short_names = {"block_h": "bh", "block_n": "n", "v_split": "vs", "num_warps": "w", "num_stages": "s",
                   "index_prefetch": "ip"}
    variants = (TL, GLUON, GLUON_SPLIT)
    signature = Signature((tensor("q"), tensor("kv"), tensor("indices"), SM_SCALE, ATTN_SINK, TOPK_LENGTH),
                          returns=("out", "lse"), extra_outputs=("max_logits",))
    # gradients flow to q, kv and attn_sink through out; the lse is a statistic (the indexer loss
    # reads it detached), so it carries none
    gradient = Gradient("sparse_attention_bwd", ("lse",), attention_backward_args, attention_input_gradients)

    def derived(self, spec, point, backend):
        if backend != "triton":
            return {"rope_dim": spec.attention.rope_dim}
        tiles = self.tile_dims(spec)
        return tiles | {"dv_chunk": tiles["dv_pad"] // point.get("v_split", 1)}

    def upgrade_schedule(self, schedule):
        """An entry of a dsagen that chose the algorithm by the knob `gluon` (0, 1, 2): the variant
        it names, with the knobs that variant tunes."""
        schedule = dict(schedule)
        algorithm = schedule.get(LEGACY_ALGORITHM_KNOB)
        if "variant" in schedule or algorithm not in range(len(self.variants)):
            return schedule  # today's form, or a value no variant had (it then fits no space)
        del schedule[LEGACY_ALGORITHM_KNOB]
        variant = self.variants[algorithm]
        if variant is not TL:
            schedule = {k: v for k, v in schedule.items() if k in GLUON_KNOBS}
        return {"variant": variant.name, **schedule}

    def cost(self, spec):
        at, k = spec.attention, spec.topk.k
        flops = 2 * S * at.heads * k * (at.qk_dim + at.v_dim)
        nbytes = (S * at.heads * at.qk_dim * 2  # q
                  + sp.Min(SKV, S * k) * at.qk_dim * 2  # each kv row at most once
                  + S * k * 4  # indices
                  + S * at.heads * at.v_dim * 2 + S * at.heads * 4)  # out, lse
        return Cost(self.name, flops, nbytes, "bf16")

    def check_args(self, spec, q, kv, indices, sm_scale=None, attn_sink=None, topk_length=None, out=None, lse=None,
                   max_logits=None):
        at = spec.attention
        dtype = TORCH_DTYPES[at.dtype]
        check_tensor("q", q, dtype, (None, at.heads, at.qk_dim))
        dev, n_q = q.device, q.shape[0]
        check_tensor("kv", kv, dtype, (None, at.qk_dim), dev)
        check_tensor("indices", indices, torch.int32, (n_q, spec.topk.k), dev)
        softmax_scale(spec, sm_scale)
        check_out("attn_sink", attn_sink, torch.float32, (at.heads,), dev)
        check_out("topk_length", topk_length, torch.int32, (n_q,), dev)
        check_out("out", out, dtype, (n_q, at.heads, at.v_dim), dev)
        check_out("lse", lse, torch.float32, (n_q, at.heads), dev)
        check_out("max_logits", max_logits, torch.float32, (n_q, at.heads), dev)
        if kv.shape[0] >= 2**31 - 1:
            raise ValueError(f"kv has {kv.shape[0]} rows: int32 indices address at most 2**31 - 2")
        return Call(dev, n_q, kv.shape[0])

    def fake(self, spec, q, kv, indices, sm_scale, attn_sink=None, topk_length=None):
        at = spec.attention
        return (q.new_empty((q.shape[0], at.heads, at.v_dim)),
                q.new_empty((q.shape[0], at.heads), dtype=torch.float32))


SPARSE_ATTENTION = SparseAttentionOp()
