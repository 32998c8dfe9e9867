"""Benchmarks: each generated kernel beside naive PyTorch in the same run, checked before timed.

Timing is triton.testing.do_bench's median (CUDA events) after warm-up, on the inputs of
dsagen.workloads (at the V3.2 shapes all larger than the H200's 50 MB L2). Every timed kernel is
first checked against the float64 reference on a sample of rows, so a number never comes from a
wrong kernel. `dsagen bench` adds dense attention of the same shape, a table, JSON and a plot.
"""
from __future__ import annotations

import datetime
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .__version__ import __version__
from .gpus import GPU, cpu_model
from .kernels import DSAKernels
from .ops import stages
from .spec import Spec
from .timing import cpu_ms, cuda_events_ms, cuda_graph_ms
from .workloads import rates, sample_rows, validate_shape, workload


@dataclass
class BenchRow:
    kernel: str
    shape: dict
    ms: float
    naive_ms: float | None
    naive: str
    tflops: float | None
    gbps: float | None
    floor_ms: float | None
    pct_of_roofline: float | None
    speedup_vs_naive: float | None
    schedule: dict
    schedule_source: str
    check: str
    warning: str | None = None  # why this row's speed-up would mislead (printed under the table)


def bench_kernel(kernels: DSAKernels, kernel: str, gpu: GPU, S: int, SKV: int, naive: bool = True,
                 seed: int = 0, device: str = "cuda", graph: bool = False) -> BenchRow:
    """Check, then time one kernel (the schedule its build resolves for this shape) and naive PyTorch.
    On the CPU there is no roofline to compare with: those columns stay empty. graph: time CUDA-graph
    replays (what a decode step runs: no host launch cost, L2 not flushed) instead of CUDA events
    around each eager call."""
    validate_shape(S, SKV)
    spec = kernels.spec
    op = workload(kernel)
    eager_timer = cuda_events_ms if device == "cuda" else cpu_ms  # naive PyTorch runs eagerly, as written
    timer = cuda_graph_ms if graph and device == "cuda" else eager_timer
    inputs = op.inputs(spec, S, SKV, device, seed)
    outs = op.poisoned_outputs(spec, inputs)

    def run():
        return kernels.launch(kernel, inputs, outs)

    result = run()
    checked = op.check(spec, inputs, result, sample_rows(S, 6, seed))
    ms = timer(run)
    naive_ms = eager_timer(op.naive(spec, inputs)) if naive else None
    r = rates(spec, kernel, S, SKV, ms, gpu)
    if device != "cuda":  # a GPU's roofline and bandwidth say nothing about a CPU run
        r["floor_ms"] = r["pct_of_roofline"] = r["gbps"] = None
    hit = kernels.resolve(kernel, *op.call_shape(S, SKV), device)
    return BenchRow(kernel, op.shape_info(spec, S, SKV), ms, naive_ms, op.naive_name, r["tflops"],
                    r["gbps"], r["floor_ms"], r["pct_of_roofline"],
                    naive_ms / ms if naive_ms else None, hit.point, hit.source, checked,
                    op.bench_warning(spec, S, SKV))


def dense_attention_ms(spec: Spec, S: int, SKV: int, chunk: int = 512) -> float:
    """Dense causal MLA attention of the same shape (every query attends to all its SKV - S + t + 1
    keys) with torch's scaled_dot_product_attention, in chunks of queries: what DSA replaces."""
    at = spec.attention
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, at.heads, S, at.qk_dim, device="cuda", generator=g).bfloat16()
    kv = torch.randn(1, 1, SKV, at.qk_dim, device="cuda", generator=g).bfloat16()
    k = kv.expand(1, at.heads, SKV, at.qk_dim)
    v = kv[..., :at.v_dim].expand(1, at.heads, SKV, at.v_dim)
    pos = torch.arange(SKV - S, SKV, device="cuda")
    cols = torch.arange(SKV, device="cuda")

    def run():
        for s0 in range(0, S, chunk):
            mask = cols[None, :] <= pos[s0:s0 + chunk, None]
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, s0:s0 + chunk], k, v, attn_mask=mask, scale=at.softmax_scale)

    return cuda_events_ms(run, warmup=25, rep=100)


def run_bench(kernels: DSAKernels, gpu: GPU, shapes: list[tuple[int, int]], kernel_names=None,
              dense: bool = True, progress: Callable[[str], None] = print, device: str = "cuda",
              graph: bool = False) -> dict:
    """Every kernel at every shape, plus DSA (the three together) against dense attention.
    graph: time CUDA-graph replays of each kernel instead of eager calls (naive PyTorch stays eager).
    kernel_names: default the DSA stages (the registry's, in pipeline order)."""
    kernel_names = stages() if kernel_names is None else kernel_names
    rows: list[BenchRow] = []
    totals = []
    for S, SKV in shapes:
        here = []
        for kernel in kernel_names:
            row = bench_kernel(kernels, kernel, gpu, S, SKV, device=device, graph=graph)
            rows.append(row)
            here.append(row)
            progress(format_table([row]).splitlines()[-1])
            if row.warning:
                progress(f"warning: {row.kernel} S={S} SKV={SKV}: {row.warning}")
        if dense and set(kernel_names) == set(stages()):
            dsa = sum(r.ms for r in here)
            try:
                dense_ms = dense_attention_ms(kernels.spec, S, SKV)
            except torch.OutOfMemoryError:
                dense_ms = None
            totals.append({"S": S, "SKV": SKV, "dsa_ms": dsa, "dense_attention_ms": dense_ms,
                           "dense_over_dsa": dense_ms / dsa if dense_ms else None})
            progress(f"S={S} SKV={SKV}: DSA (indexer + top-k + sparse attention) {dsa:.3f} ms, "
                     f"dense attention {'out of memory' if dense_ms is None else f'{dense_ms:.3f} ms'}")
    env = environment() | {"backend": kernels.backend, "device": device,
                           "timing": "cuda graph replays" if graph and device == "cuda" else "eager calls"}
    return {"environment": env, "results": [asdict(r) for r in rows], "dsa_vs_dense": totals}


def environment() -> dict:
    import triton

    return {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "dsagen": __version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
    }


def _fmt(value, spec: str, suffix: str = "") -> str:
    """A number with its unit suffix, or "-" where there is none (no roofline on a CPU, say)."""
    return "-" if value is None else format(value, spec) + suffix


def format_table(rows: list[BenchRow]) -> str:
    head = (f"{'kernel':<17}{'S':>6}{'SKV':>8}{'ms':>9}{'naive ms':>10}{'speed-up':>9}{'TFLOP/s':>9}"
            f"{'GB/s':>7}{'floor ms':>10}{'% roof':>8}  schedule")
    lines = [head, "-" * len(head)]
    for r in rows:
        sched = " ".join(f"{k}={v}" for k, v in r.schedule.items())
        tag = "tuned" if r.schedule_source.startswith("tuned") else r.schedule_source.split(" ")[0]
        lines.append(f"{r.kernel:<17}{r.shape['S']:>6}{r.shape['SKV']:>8}{r.ms:>9.3f}{_fmt(r.naive_ms, '.3f'):>10}"
                     f"{_fmt(r.speedup_vs_naive, '.2f', 'x'):>9}{_fmt(r.tflops, '.0f' if (r.tflops or 0) >= 10 else '.3f'):>9}{_fmt(r.gbps, '.0f'):>7}"
                     f"{_fmt(r.floor_ms, '.3f'):>10}{_fmt(r.pct_of_roofline, '.1f', '%'):>8}  {sched} ({tag})")
    return "\n".join(lines)


def to_json(rows: list[BenchRow]) -> str:
    return json.dumps({"environment": environment(), "results": [asdict(r) for r in rows]}, indent=1)


def plot(payload: dict, path: Path) -> Path:
    """Time against context length: DSA (three kernels) and dense attention, one line pair per S."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_s: dict[int, list[dict]] = {}
    for t in payload["dsa_vs_dense"]:
        by_s.setdefault(t["S"], []).append(t)
    for S, pts in sorted(by_s.items()):
        pts.sort(key=lambda t: t["SKV"])
        x = [t["SKV"] for t in pts]
        line, = ax.plot(x, [t["dsa_ms"] for t in pts], marker="o", label=f"DSA (dsagen), S={S}")
        dense = [(t["SKV"], t["dense_attention_ms"]) for t in pts if t["dense_attention_ms"]]
        if dense:
            ax.plot(*zip(*dense), marker="s", linestyle="--", color=line.get_color(),
                    label=f"dense attention (torch SDPA), S={S}")
    env = payload["environment"]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length SKV (tokens)")
    ax.set_ylabel("time per layer forward (ms)")
    ax.set_title(f"{env.get('gpu')}: DSA vs dense MLA attention ({env['date']})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


__all__ = ["BenchRow", "bench_kernel", "dense_attention_ms", "environment", "format_table",
           "plot", "run_bench", "to_json"]
