"""Step 2 of the pipeline, plan: what a kernel costs and the numbers its schedule is written in.

Each op declares its costs as sympy expressions of the problem sizes defined here (S queries, SKV
keys, the mean window length W), so `dsagen check` can print them symbolically and evaluate them
for any size; the roofline floor is max(FLOPs / peak, bytes / bandwidth) on a named GPU. The
problem symbols of a schedule file are the GPU's shared memory per block, then the op's own; the
semantic hash keys the tuning database by the spec fields the ops' math reads.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Mapping

import sympy as sp

# the problem sizes every op's costs are written in: S queries (rows), SKV keys, and the mean
# window length W (causal queries at the end of the context see fewer than SKV keys)
S, SKV, W = sp.symbols("S SKV W", positive=True, integer=True)


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): tiles are padded to it and masked."""
    p = minimum
    while p < n:
        p *= 2
    return p


def causal_window_mean(s: int, skv: int) -> float:
    """Mean window length when the S queries are the last S positions of a causal SKV context."""
    return skv - s + (s + 1) / 2


@dataclass(frozen=True)
class Cost:
    """FLOPs and the fewest bytes (each input read once, each output written once) as sympy
    expressions of S, SKV, W; `compute_unit` names the peak the FLOPs run at."""

    kernel: str
    flops: sp.Expr
    bytes: sp.Expr
    compute_unit: str  # "bf16", "fp8" or "none"

    def evaluate(self, sizes: Mapping[str, float]) -> tuple[float, float]:
        subs = {S: sizes["S"], SKV: sizes["SKV"], W: sizes.get("W", sizes["SKV"])}
        return float(sp.sympify(self.flops).subs(subs)), float(sp.sympify(self.bytes).subs(subs))

    def floor_ms(self, sizes: Mapping[str, float], gpu) -> tuple[float, str]:
        """Roofline floor in ms on `gpu` and which term binds ('compute' or 'memory')."""
        flops, nbytes = self.evaluate(sizes)
        mem_ms = nbytes / (gpu.bandwidth_tbps * 1e12) * 1e3
        peak = {"bf16": gpu.bf16_tflops, "fp8": gpu.fp8_tflops or gpu.bf16_tflops, "none": None}[self.compute_unit]
        comp_ms = flops / (peak * 1e12) * 1e3 if peak else 0.0
        return (comp_ms, "compute") if comp_ms >= mem_ms else (mem_ms, "memory")


def problem_symbols(spec, op, gpu) -> dict[str, int]:
    """The numbers a schedule's footprint and constraints are written in (schedules/*.toml): the
    GPU's shared memory per block, then the op's own."""
    return {"smem_limit": gpu.smem_per_block} | op.problem_symbols(spec)


def semantic_hash(spec, ops: Iterable) -> str:
    """Hash of what the math of `ops` reads from `spec` (their semantic fields): not the name, the
    schedule or the run-time softmax scale. One op: a kernel tuned for one model is found by every
    spec whose fields it reads are the same."""
    payload = {op.name: op.semantic_fields(spec) for op in ops}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
