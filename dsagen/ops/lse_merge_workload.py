"""The LSE merge's workload: a decode step's partials from WORKLOAD_PARTIALS ranks (bf16 outs,
fp32 lses, one partial in 16 without mass), checked against the float64 merge; the torch merge
(logsumexp, exp, weighted sum) is the baseline."""
from __future__ import annotations

import math

import torch

from ..verify import assert_close
from .workload import Workload, generator

# partials per (token, head) in the workload: a decode step over 8 ranks
WORKLOAD_PARTIALS = 8


def reference_lse_merge(outs: torch.Tensor, lses: torch.Tensor,
                        attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (out [N, H, Dv], lse [N, H]) from outs [P, N, H, Dv] and lses [P, N, H]: the finite
    lses carry mass, the rest none; no mass: out 0, lse +inf; a NaN lse: both NaN. attn_sink [H]:
    the sink's exp(sink) joins the denominator, so out shrinks by exp(lse) / (exp(lse) + exp(sink))
    where there is mass; lse is the partials' alone."""
    lse64, out64 = lses.detach().cpu().double(), outs.detach().cpu().double()
    finite = torch.isfinite(lse64)
    peak = torch.where(finite, lse64, -math.inf).amax(0)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    weight = torch.where(finite, torch.exp(torch.where(finite, lse64, 0.0) - peak), 0.0)
    total = weight.sum(0)
    terms = torch.where(finite[..., None], weight[..., None] * out64, 0.0).sum(0)
    out = terms / torch.where(total > 0, total, 1.0)[..., None]
    lse = torch.where(total > 0, peak + torch.log(torch.where(total > 0, total, 1.0)), math.inf)
    if attn_sink is not None:
        sink = attn_sink.detach().cpu().double()
        has_mass = (total > 0)[..., None]
        out = torch.where(has_mass, out * torch.sigmoid(torch.where(has_mass[..., 0], lse, 0.0) - sink)[..., None], out)
    nan = torch.isnan(lse64).any(0)
    return torch.where(nan[..., None], math.nan, out), torch.where(nan, math.nan, lse)


def naive_lse_merge(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch in fp32: logsumexp over the partials, then the weighted sum (no NaN rule)."""
    lse = torch.logsumexp(lses, 0)
    weight = torch.exp(lses - lse).nan_to_num(0.0)
    return (weight[..., None] * outs.float()).sum(0).to(outs.dtype), lse


class LseMergeWorkload(Workload):
    kernel = "lse_merge"
    naive_name = "torch logsumexp + weighted sum (fp32)"
    # the weights and sums are fp32 (relative 1e-7 each); out is rounded once to its dtype
    tolerances = {"out.bf16": 1e-2, "out.fp32": 1e-5, "lse": 1e-6}

    def reference(self, spec, outs, lses):
        return reference_lse_merge(outs, lses)

    def inputs(self, spec, S_, SKV_, device, seed):
        """S_ query tokens of the spec's heads and v_dim, each merged from WORKLOAD_PARTIALS
        partials (the context SKV_ does not change the merge); lses spread over +-8, one in 16
        +inf (a rank without a selected key)."""
        at, g = spec.attention, generator(device, seed)
        shape = (WORKLOAD_PARTIALS, S_, at.heads)
        outs = torch.randn(*shape, at.v_dim, device=device, generator=g).bfloat16()
        lses = torch.rand(shape, device=device, generator=g) * 16 - 8
        empty = torch.rand(shape, device=device, generator=g) < 1 / 16
        return (outs, torch.where(empty, math.inf, lses))

    def poisoned_outputs(self, spec, inputs):
        outs, lses = inputs
        return {"out": torch.full(outs.shape[1:], math.nan, dtype=outs.dtype, device=outs.device),
                "lse": torch.full(lses.shape[1:], math.nan, device=lses.device)}

    def check(self, spec, inputs, result, rows):
        outs, lses = inputs
        out, lse = result
        r = rows.to(outs.device)
        ref_out, ref_lse = reference_lse_merge(outs[:, r], lses[:, r])
        dtype = "bf16" if outs.dtype == torch.bfloat16 else "fp32"
        r1 = assert_close("lse_merge.out", out[r], ref_out, self.tolerance(f"out.{dtype}"))
        r2 = assert_close("lse_merge.lse", lse[r], ref_lse, self.tolerance("lse"))
        return f"float64 reference on {len(rows)} tokens, RMS ratio out {r1:.2e}, lse {r2:.2e}"

    def naive(self, spec, inputs):
        return lambda: naive_lse_merge(*inputs)

    def call_shape(self, S_, SKV_):
        return S_, WORKLOAD_PARTIALS

    def shape_info(self, spec, S_, SKV_):
        at = spec.attention
        return {"S": S_, "SKV": SKV_, "N": S_, "P": WORKLOAD_PARTIALS, "H": at.heads, "Dv": at.v_dim, "dtype": "bf16"}

    def sizes(self, S_, SKV_):
        return {"S": S_, "SKV": WORKLOAD_PARTIALS, "W": WORKLOAD_PARTIALS}


WORKLOAD = LseMergeWorkload()
