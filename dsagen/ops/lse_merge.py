"""The LSE merge: one attention output from P partials over disjoint key sets, through their
natural-log log-sum-exps (context parallelism's last step, or any split attention).

outs [P, N, H, Dv] bf16 or fp32 and lses [P, N, H] fp32 -> (out [N, H, Dv] in outs' dtype, lse
[N, H] fp32):
    lse = log sum_p exp(lses[p])          over the partials with a finite lse,
    out = sum_p exp(lses[p] - lse) outs[p] in fp32, then cast.
A partial whose lse is +inf (dsagen's attention kernels' "no valid key") or -inf carries no mass
and its out is never read; a (token, head) with no mass anywhere gets out 0 and lse +inf; a NaN lse
makes that (token, head) NaN, and a NaN out of a partial with mass propagates.

attn_sink [H] fp32 (optional; DeepSeek-V4's learned sink per head): after the merge, out *=
1 / (1 + exp(attn_sink[h] - lse)) with lse unchanged. It applies once, to the merged result, since
the sink is one more term of the whole softmax's denominator, not of any partial's. -inf has no
effect, +inf zeroes that head's out; a (token, head) without mass keeps out 0; a NaN sink makes
the out of a (token, head) with mass NaN.

The kernel is shape-generic: P, N, H and Dv are run-time sizes, so its math reads no spec field
(no semantic fields) and one generated module serves every spec: a build of any spec merges the
partials of any attention. Its tuned schedules are keyed by the call shape alone (S = N tokens,
SKV = P partials); its workload draws the spec's heads and v_dim, the sizes a tuning run times.
"""
from __future__ import annotations

import torch

from ..plan import SKV, Cost, S
from .base import DECODE_TUNING, Call, Gradient, Op, Tuning
from .checks import check_out, check_tensor
from .signature import Arg, Signature, tensor

MERGE_DTYPES = (torch.bfloat16, torch.float32)


def check_outs_dtype(outs) -> None:
    if isinstance(outs, torch.Tensor) and outs.dtype not in MERGE_DTYPES:
        raise ValueError(f"outs must have dtype torch.bfloat16 or torch.float32, got {outs.dtype}")


class LseMergeOp(Op):
    name = "lse_merge"
    position = 120
    summary = "LSE merge: out [N, H, Dv] and natural-log lse [N, H] from P partial attention outputs and their LSEs"
    doc = ("(out [N, H, Dv] in outs' dtype, lse [N, H] fp32) merged from outs [P, N, H, Dv] (bf16 or fp32)\n"
           "and lses [P, N, H] fp32 (natural log; +inf or -inf: the partial has no mass; NaN propagates).\n"
           "attn_sink [H] fp32 (optional): out *= 1 / (1 + exp(attn_sink[h] - lse)) after the merge, lse unchanged.")
    backends = ("triton", "tvm")
    short_names = {"block_rows": "r", "block_d": "d", "num_warps": "w"}
    signature = Signature((tensor("outs"), tensor("lses"), Arg("attn_sink", "Tensor?", default=None)), returns=("out", "lse"))
    # a decode step's 256 query tokens over 8 ranks
    tuning = Tuning(canonical_shape=(DECODE_TUNING.canonical_shape[0], 8), near_fields=())
    gradient = Gradient(hint="merge_attention differentiates through plain torch ops when an input requires grad")

    def semantic_fields(self, spec):
        return {}  # every size is read at run time: one module for every spec

    def module_stem(self, spec):
        return "lse_merge"

    def cost(self, spec):
        """Memory-bound: each partial's bf16 out and fp32 lse read once, the merged pair written
        once; 2 FLOPs per partial value (scale, add). Sized at the spec's heads and v_dim (the
        workload's shape)."""
        at = spec.attention
        rows = S * at.heads
        nbytes = SKV * rows * (at.v_dim * 2 + 4) + rows * (at.v_dim * 2 + 4)
        return Cost(self.name, 2 * SKV * rows * at.v_dim, nbytes, "none")

    def check_args(self, spec, outs, lses, attn_sink=None, out=None, lse=None):
        check_outs_dtype(outs)
        check_tensor("outs", outs, outs.dtype, (None, None, None, None))
        dev, (P, N, H, Dv) = outs.device, outs.shape
        if P < 1:
            raise ValueError("outs must hold at least one partial (P >= 1), got P = 0")
        check_tensor("lses", lses, torch.float32, (P, N, H), dev)
        if attn_sink is not None:
            check_tensor("attn_sink", attn_sink, torch.float32, (H,), dev)
        check_out("out", out, outs.dtype, (N, H, Dv), dev)
        check_out("lse", lse, torch.float32, (N, H), dev)
        return Call(dev, N, P)

    def fake(self, spec, outs, lses, attn_sink=None):
        return outs.new_empty(outs.shape[1:]), lses.new_empty(lses.shape[1:])


LSE_MERGE = LseMergeOp()
