"""Time hand-picked schedules of one kernel at one shape, each checked against the float64 reference
first: the quick look before (or instead of) a tuning run.

    python benchmarks/schedule_sweep.py sparse_decode --S 128 --SKV 32768 \\
        --schedule '{"block_n": 64}' --schedule '{"block_n": 32, "prefetch": 1}' [--heads 64]

Unlisted knobs come from the build's resolution (override -> database -> pins -> defaults). A point
that fails to build, breaks a constraint or fails its check prints FAILED and the reason; the sweep
goes on. Prints one line per schedule: the schedule, the median ms (CUDA events around eager calls,
or with --graph CUDA-graph replays), TFLOP/s, GB/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsagen  # noqa: E402
from dsagen import bench  # noqa: E402
from dsagen.gpus import get_gpu  # noqa: E402
from dsagen.resolve import detected_gpu  # noqa: E402


def with_heads(spec, kernel: str, heads: int | None):
    """The spec with its attention (or, for the indexer kernels, its indexer) head count replaced."""
    if heads is None:
        return spec
    part = "indexer" if "indexer" in kernel else "attention"
    return dataclasses.replace(spec, **{part: dataclasses.replace(getattr(spec, part), heads=heads)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel")
    ap.add_argument("--spec", type=Path, default=Path("specs/deepseek_v32_serving.toml"))
    ap.add_argument("--S", type=int, required=True)
    ap.add_argument("--SKV", type=int, required=True)
    ap.add_argument("--heads", type=int, default=None, help="replace the spec's head count of this kernel's stage")
    ap.add_argument("--graph", action="store_true", help="time CUDA-graph replays instead of eager calls")
    ap.add_argument("--schedule", type=json.loads, action="append", default=[],
                    help="JSON object of knobs (repeatable); none = the resolved schedule")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: the sweep times kernels on a CUDA GPU")
    spec = with_heads(dsagen.load_spec(args.spec), args.kernel, args.heads)
    gpu = get_gpu(detected_gpu()[0])
    for point in args.schedule or [{}]:
        try:
            kernels = dsagen.build(spec, schedules={args.kernel: point} if point else None)
            row = bench.bench_kernel(kernels, args.kernel, gpu, args.S, args.SKV, naive=False, graph=args.graph)
        except Exception as exc:  # one bad point must not end the sweep
            print(f"{args.kernel} {json.dumps(point)} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        tflops = f"{row.tflops:.1f} TFLOP/s" if row.tflops else "-"
        timing = "graph" if args.graph else "eager"
        print(f"{args.kernel} H={args.heads or '-'} {json.dumps(row.schedule)} {row.ms:.4f} ms ({timing}) {tflops} "
              f"{row.gbps or 0:.0f} GB/s", flush=True)


if __name__ == "__main__":
    main()
