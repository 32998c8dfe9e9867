"""Symbolic planning: FLOPs, minimum bytes and the per-kernel problem symbols, with sympy.

Step 2 of the pipeline. Costs are expressions of the problem sizes (S queries, SKV keys, and the
mean window length W for the indexer), so `dsagen check` can print them symbolically and evaluate
them for any size; the roofline floor is max(FLOPs / peak, bytes / bandwidth) on a named GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .gpus import GPU
from .spec import KERNELS, Spec

S, SKV, W = sp.symbols("S SKV W", positive=True, integer=True)

_ELEM_BYTES = {"fp8_e4m3": 1, "bf16": 2}


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): tiles are padded to it and masked."""
    p = minimum
    while p < n:
        p *= 2
    return p


@dataclass(frozen=True)
class Cost:
    kernel: str
    flops: sp.Expr
    bytes: sp.Expr
    compute_unit: str  # which peak the FLOPs run at: "bf16", "fp8" or "none"

    def evaluate(self, sizes: dict[str, int]) -> tuple[float, float]:
        subs = {S: sizes["S"], SKV: sizes["SKV"], W: sizes.get("W", sizes["SKV"])}
        return float(self.flops.subs(subs)), float(self.bytes.subs(subs))

    def floor_ms(self, sizes: dict[str, int], gpu: GPU) -> tuple[float, str]:
        """Roofline floor in ms and which term binds ('compute' or 'memory')."""
        flops, nbytes = self.evaluate(sizes)
        mem_ms = nbytes / (gpu.bandwidth_tbps * 1e12) * 1e3
        peak = {"bf16": gpu.bf16_tflops, "fp8": gpu.fp8_tflops or gpu.bf16_tflops, "none": None}[
            self.compute_unit
        ]
        comp_ms = flops / (peak * 1e12) * 1e3 if peak else 0.0
        return (comp_ms, "compute") if comp_ms >= mem_ms else (mem_ms, "memory")


def cost(spec: Spec, kernel: str) -> Cost:
    """FLOPs and the fewest bytes each input read once and each output written once."""
    if kernel == "indexer":
        ix = spec.indexer
        eb = _ELEM_BYTES[ix.dtype]
        flops = 2 * S * W * ix.heads * ix.head_dim
        nbytes = (S * ix.heads * ix.head_dim * eb  # q
                  + SKV * ix.head_dim * eb + SKV * 4  # k, k_scale
                  + S * ix.heads * 4 + S * 8  # weights, ks/ke
                  + S * SKV * 4)  # logits
        return Cost(kernel, flops, nbytes, "fp8" if ix.dtype == "fp8_e4m3" else "bf16")
    if kernel == "indexer_topk":  # the indexer's useful FLOPs; its inputs read once, indices written
        ix, k = spec.indexer, spec.topk.k
        eb = _ELEM_BYTES[ix.dtype]
        flops = 2 * S * W * ix.heads * ix.head_dim
        nbytes = (S * ix.heads * ix.head_dim * eb + SKV * ix.head_dim * eb + SKV * 4
                  + S * ix.heads * 4 + S * 8 + S * k * 4)
        return Cost(kernel, flops, nbytes, "fp8" if ix.dtype == "fp8_e4m3" else "bf16")
    if kernel == "topk":
        k = spec.topk.k
        return Cost(kernel, sp.Integer(0), S * SKV * 4 + S * 8 + S * k * 4, "none")
    if kernel == "sparse_attention":
        at, k = spec.attention, spec.topk.k
        flops = 2 * S * at.heads * k * (at.qk_dim + at.v_dim)
        nbytes = (S * at.heads * at.qk_dim * 2  # q
                  + sp.Min(SKV, S * k) * at.qk_dim * 2  # each kv row at most once
                  + S * k * 4  # indices
                  + S * at.heads * at.v_dim * 2 + S * at.heads * 4)  # out, lse
        return Cost(kernel, flops, nbytes, "bf16")
    raise ValueError(f"unknown kernel {kernel!r}: allowed {', '.join(KERNELS)}")


def problem_symbols(spec: Spec, kernel: str, gpu: GPU) -> dict[str, int]:
    """The numbers a schedule's footprint and constraints are written in (schedules/*.toml)."""
    common = {"smem_limit": gpu.smem_per_block}
    if kernel in ("indexer", "indexer_topk"):
        ix = spec.indexer
        return common | ({"k": spec.topk.k} if kernel == "indexer_topk" else {}) | {
            "heads": ix.heads,
            "heads_pad": next_pow2(ix.heads),
            "d_pad": next_pow2(ix.head_dim, 32),
            "elem_bytes": _ELEM_BYTES[ix.dtype],
        }
    if kernel == "topk":
        return common | {"k": spec.topk.k}
    if kernel == "sparse_attention":
        at = spec.attention
        return common | {
            "heads": at.heads,
            "heads_pad": next_pow2(at.heads),
            "dv_pad": next_pow2(at.v_dim, 16),
            "dr_pad": next_pow2(at.rope_dim, 16) if at.rope_dim else 0,
        }
    raise ValueError(f"unknown kernel {kernel!r}: allowed {', '.join(KERNELS)}")


def causal_window_mean(s: int, skv: int) -> float:
    """Mean window length when the S queries are the last S positions of a causal SKV context."""
    return skv - s + (s + 1) / 2
