"""Merging partial attention outputs through their log-sum-exps.

A partial (out_p, lse_p) is a softmax-weighted mean over a subset of a query's keys and the
natural-log sum of its exponentiated scores. Over disjoint subsets,
    lse = log sum_p exp(lse_p),    out = sum_p exp(lse_p - lse) out_p.
The kernels' convention for a subset with no valid key is out 0 and lse +inf (docs/numerics.md);
here such a partial carries no mass, and so does one with lse -inf (an empty sum's log): only
finite lses count. A query with no mass anywhere gets out 0 and lse +inf, as a single kernel would
give. A NaN lse makes that (query, head) NaN; a NaN out with mass propagates.

An attention sink (DeepSeek-V4: one learned logit per head, exp(sink) added to the whole softmax's
denominator) applies once, after the merge: out *= 1 / (1 + exp(sink - lse)), lse unchanged. Applied
to each partial instead it would be counted P times.

The merge runs as the generated `lse_merge` kernel of a build (the caller's, else one of the
default spec: the kernel reads every size at run time); plain torch (the same math, fp32) takes the calls the kernel cannot: an input that
requires grad (the kernel has no backward; torch's ops differentiate), outs neither bf16 nor fp32,
tensors on a device other than CPU and CUDA.
"""
from __future__ import annotations

import functools
import math

import torch

from ..backends.tvm import available as tvm_problem
from ..kernels import DSAKernels, build
from ..ops.checks import check_tensor
from ..ops.lse_merge import MERGE_DTYPES
from ..spec import Spec


def _stack(parts, name: str) -> torch.Tensor:
    if isinstance(parts, torch.Tensor):
        return parts
    parts = list(parts)
    if not parts:
        raise ValueError(f"{name} must hold at least one partial")
    return torch.stack(parts)


def merge_attention(outs, lses, kernels: DSAKernels | None = None,
                    attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [..., Dv] in outs' dtype, lse [...] fp32) from P partials: outs [P, ..., Dv] and lses
    [P, ...] (tensors stacked on the first dimension, or sequences of P tensors), any source.

    kernels: the build whose lse_merge runs the merge (a TVM build on CUDA tensors, whose merge is
    CPU-only, merges with the Triton kernel of its spec); None: a build of the default spec (the
    kernel reads no spec field). attn_sink [H] fp32, H the last leading dimension: applied once to
    the merged out (out *= 1 / (1 + exp(attn_sink[h] - lse)), lse unchanged)."""
    outs, lses = _stack(outs, "outs"), _stack(lses, "lses")
    if outs.shape[:-1] != lses.shape:
        raise ValueError(f"outs {list(outs.shape)} and lses {list(lses.shape)} must agree on [P, ...] "
                         "(outs has one more trailing dimension, the value columns)")
    if not lses.is_floating_point() or not outs.is_floating_point():
        raise ValueError(f"outs and lses must be floating point, got {outs.dtype} and {lses.dtype}")
    if outs.shape[0] == 0:
        raise ValueError("outs must hold at least one partial")
    _check_sink(attn_sink, lses)
    if not kernel_merges(outs, lses, attn_sink):
        return merge_in_torch(outs, lses, attn_sink)
    return merge_in_kernel(outs, lses, kernels, attn_sink)


def _check_sink(attn_sink, lses: torch.Tensor) -> None:
    """attn_sink: None, or fp32 [H] on lses' device, H the last leading dimension (one per head)."""
    if attn_sink is not None:
        check_tensor("attn_sink", attn_sink, torch.float32, (lses.shape[-1] if lses.dim() > 1 else 1,), lses.device)


def kernel_merges(outs: torch.Tensor, lses: torch.Tensor, attn_sink: torch.Tensor | None = None) -> bool:
    """Whether the generated kernel takes this merge (see the module's docstring for the rest)."""
    wants_grad = torch.is_grad_enabled() and (outs.requires_grad or lses.requires_grad or (
        attn_sink is not None and attn_sink.requires_grad))
    return not wants_grad and outs.dtype in MERGE_DTYPES and outs.device.type in ("cpu", "cuda")


def merge_in_kernel(outs: torch.Tensor, lses: torch.Tensor, kernels: DSAKernels | None,
                    attn_sink: torch.Tensor | None = None):
    """The kernel's view of any [P, ..., Dv]: [P, N, H, Dv] with H the last leading dimension (1 when
    there is none) and N the others flattened; lses as fp32, both unit-stride in their last one."""
    P, lead, dv = outs.shape[0], lses.shape[1:], outs.shape[-1]
    heads = lead[-1] if lead else 1
    tokens = math.prod(lead[:-1]) if lead else 1
    flat_outs = outs.reshape(P, tokens, heads, dv)
    flat_lses = lses.float().reshape(P, tokens, heads)
    flat_outs = flat_outs if flat_outs.stride(-1) == 1 or dv <= 1 else flat_outs.contiguous()
    flat_lses = flat_lses if flat_lses.stride(-1) == 1 or heads <= 1 else flat_lses.contiguous()
    sink = None if attn_sink is None else attn_sink.contiguous()
    out, lse = merge_kernels(kernels, outs.device).lse_merge(flat_outs, flat_lses, sink)
    return out.reshape(*lead, dv), lse.reshape(lead)


def merge_kernels(kernels: DSAKernels | None, device: torch.device) -> DSAKernels:
    """The build whose lse_merge runs: the caller's where its backend runs on `device`, else one of
    the same spec (or of the default spec: the kernel reads no spec field) on a backend that does."""
    on_gpu = device.type == "cuda"
    if kernels is not None and not (on_gpu and kernels.backend == "tvm"):
        return kernels
    spec = kernels.spec if kernels is not None else Spec(name="lse_merge")
    backend = "triton" if on_gpu or tvm_problem() is not None else "tvm"
    return _build(spec, backend)


@functools.lru_cache(maxsize=None)
def _build(spec: Spec, backend: str) -> DSAKernels:
    return build(spec, backend=backend)


def merge_in_torch(outs: torch.Tensor, lses: torch.Tensor,
                   attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same merge in plain torch ops (fp32), differentiable (the sink too)."""
    lse32 = lses.float()
    has_mass = torch.isfinite(lse32)  # +inf: no valid key, -inf: no mass; NaN: handled below
    peak = torch.where(has_mass, lse32, -math.inf).amax(0)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    weight = torch.where(has_mass, torch.exp(torch.where(has_mass, lse32, 0.0) - peak), 0.0)  # [P, ...]
    total = weight.sum(0)
    terms = torch.where(has_mass[..., None], weight[..., None] * outs.float(), 0.0)
    out = terms.sum(0) / torch.where(total > 0, total, 1.0)[..., None]
    lse = torch.where(total > 0, peak + torch.log(torch.where(total > 0, total, 1.0)), math.inf)
    if attn_sink is not None:  # no mass: out stays 0, whatever the sink
        kept = torch.sigmoid(torch.where(total > 0, lse, 0.0) - attn_sink.float())
        out = torch.where((total > 0)[..., None], out * kept[..., None], out)
    nan = torch.isnan(lse32).any(0)
    lse = torch.where(nan, math.nan, lse)
    out = torch.where(nan[..., None], math.nan, out)
    return out.to(outs.dtype), lse
