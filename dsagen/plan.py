"""Symbolic planning: FLOPs, minimum bytes and problem symbols of a kernel, with sympy.

Step 2 of the pipeline. Each op declares its costs as expressions of the problem sizes (S queries,
SKV keys, the mean window length W), so `dsagen check` can print them symbolically and evaluate
them for any size; the roofline floor is max(FLOPs / peak, bytes / bandwidth) on a named GPU.
"""
from __future__ import annotations

from .gpus import GPU
from .ops import get_op
from .ops.base import SKV, Cost, S, W, causal_window_mean, next_pow2
from .spec import Spec

__all__ = ["Cost", "S", "SKV", "W", "causal_window_mean", "cost", "next_pow2", "problem_symbols"]


def cost(spec: Spec, kernel: str) -> Cost:
    """FLOPs and the fewest bytes (each input read once, each output written once) of `kernel`."""
    return get_op(kernel).cost(spec)


def problem_symbols(spec: Spec, kernel: str, gpu: GPU) -> dict[str, int]:
    """The numbers a schedule's footprint and constraints are written in (schedules/*.toml): the
    GPU's shared memory per block, then the op's own."""
    return {"smem_limit": gpu.smem_per_block} | get_op(kernel).problem_symbols(spec)
