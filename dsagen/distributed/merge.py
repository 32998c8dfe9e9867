"""Merging partial attention outputs through their log-sum-exps.

A partial (out_p, lse_p) is a softmax-weighted mean over a subset of a query's keys and the
natural-log sum of its exponentiated scores. Over disjoint subsets,
    lse = log sum_p exp(lse_p),    out = sum_p exp(lse_p - lse) out_p.
The kernels' convention for a subset with no valid key is out 0 and lse +inf (docs/numerics.md);
here such a partial carries no mass. A query with no mass anywhere gets out 0 and lse +inf, as a
single kernel would give. A NaN lse makes that (query, head) NaN; a NaN out with mass propagates.

Plain torch for now (fp32 arithmetic, out cast back to the partials' dtype); a generated LSE-merge
kernel would fuse these few elementwise passes.
"""
from __future__ import annotations

import math

import torch


def _stack(parts, name: str) -> torch.Tensor:
    if isinstance(parts, torch.Tensor):
        return parts
    parts = list(parts)
    if not parts:
        raise ValueError(f"{name} must hold at least one partial")
    return torch.stack(parts)


def merge_attention(outs, lses) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [..., Dv] in outs' dtype, lse [...] fp32) from P partials: outs [P, ..., Dv] and lses
    [P, ...] (tensors stacked on the first dimension, or sequences of P tensors), any source."""
    outs, lses = _stack(outs, "outs"), _stack(lses, "lses")
    if outs.shape[:-1] != lses.shape:
        raise ValueError(f"outs {list(outs.shape)} and lses {list(lses.shape)} must agree on [P, ...] "
                         "(outs has one more trailing dimension, the value columns)")
    if not lses.is_floating_point() or not outs.is_floating_point():
        raise ValueError(f"outs and lses must be floating point, got {outs.dtype} and {lses.dtype}")
    lse32 = lses.float()
    has_mass = lse32 < math.inf  # +inf: no valid key; NaN: handled below
    peak = torch.where(has_mass, lse32, -math.inf).amax(0)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    weight = torch.where(has_mass, torch.exp(lse32 - peak), 0.0)  # [P, ...]
    total = weight.sum(0)
    terms = torch.where(has_mass[..., None], weight[..., None] * outs.float(), 0.0)
    out = terms.sum(0) / torch.where(total > 0, total, 1.0)[..., None]
    lse = torch.where(total > 0, peak + torch.log(total), math.inf)
    nan = torch.isnan(lse32).any(0)
    lse = torch.where(nan, math.nan, lse)
    out = torch.where(nan[..., None], math.nan, out)
    return out.to(outs.dtype), lse
