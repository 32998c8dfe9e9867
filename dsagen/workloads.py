"""The problem each kernel is tuned and benchmarked on, shared by `dsagen tune` and `dsagen bench`.

Each kernel declares its own recipe in its workload module (dsagen/ops/<kernel>_workload.py:
inputs, poisoned outputs, the check, naive PyTorch); this module finds it (`workload`) and holds
what is common: which rows are checked, the shape rules and the rates at a time. The S
queries are the last S positions of a causal context of SKV keys. Each run writes into outputs
poisoned with values no kernel writes, so an element the kernel forgot fails the check, and the
check is the float64 reference on a sample of rows (first, last and random ones) of the very
inputs timed.
"""
from __future__ import annotations

import torch

from .ops import Op, as_op
from .ops.workload import Workload, workload_of
from .spec import Spec


def workload(kernel: str | Op) -> Workload:
    """The workload of `kernel` (an op, or its name)."""
    return workload_of(as_op(kernel))


def sample_rows(S: int, n: int, seed: int) -> torch.Tensor:
    """First, last and n-2 random rows (sorted, distinct)."""
    g = torch.Generator().manual_seed(seed)
    rows = {0, S - 1} | set(torch.randint(0, S, (max(n - 2, 0),), generator=g).tolist())
    return torch.tensor(sorted(rows))


def rates(spec: Spec, kernel: str | Op, S: int, SKV: int, ms: float, gpu) -> dict[str, float | None]:
    """TFLOP/s, GB/s and % of the roofline floor on `gpu` at `ms` (None where it means nothing)."""
    op = as_op(kernel)
    c = op.cost(spec)
    sizes = workload(op).sizes(S, SKV)
    flops, nbytes = c.evaluate(sizes)
    floor, _ = c.floor_ms(sizes, gpu)
    return {"tflops": flops / ms / 1e9 if flops else None, "gbps": nbytes / ms / 1e6 if nbytes else None,
            "floor_ms": floor, "pct_of_roofline": 100.0 * floor / ms}


def validate_shape(S: int, SKV: int) -> None:
    """The recipes put the S queries at the end of the SKV context."""
    if S < 1 or SKV < 1:
        raise ValueError(f"shape S={S}, SKV={SKV}: both must be >= 1")
    if S > SKV:
        raise ValueError(f"shape S={S}, SKV={SKV}: the queries are the last S of SKV tokens, so S <= SKV")
