"""Time the V3.2 kernels at the reference shapes of the H200 records, beside naive PyTorch, same run.

    python benchmarks/run_targets.py --out benchmarks/results [--sweep]

Writes targets-<date>.json and prints a table. --sweep also times a few schedules per kernel (each
checked against the reference first) and prints them, to see how far schedules alone move a kernel.
The shapes are those of benchmarks/results/README.md ("Shapes and peers").
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsagen  # noqa: E402
from dsagen import bench  # noqa: E402
from dsagen.gpus import get_gpu  # noqa: E402

SHAPES = {  # (S, SKV) of each kernel's reference shape
    "sparse_attention": (4096, 8192),
    "indexer": (4096, 32768),
    "topk": (4096, 32768),
}

SWEEP = {
    "sparse_attention": [
        dict(block_h=64, block_n=64, num_warps=8, num_stages=2, v_split=1, index_prefetch=0),
        dict(block_h=64, block_n=64, num_warps=8, num_stages=2, v_split=1, index_prefetch=1),
        dict(block_h=64, block_n=32, num_warps=8, num_stages=3, v_split=1, index_prefetch=1),
    ],
    "indexer": [
        dict(block_m=16, block_h=8, block_n=128, num_warps=8, num_stages=2),
        dict(block_m=2, block_h=64, block_n=128, num_warps=8, num_stages=2),
        dict(block_m=4, block_h=32, block_n=128, num_warps=8, num_stages=2),
        dict(block_m=8, block_h=16, block_n=128, num_warps=8, num_stages=3),
        dict(block_m=4, block_h=64, block_n=64, num_warps=8, num_stages=2),
        dict(block_m=32, block_h=4, block_n=128, num_warps=8, num_stages=2),
        dict(block_m=2, block_h=64, block_n=256, num_warps=8, num_stages=2),
    ],
    "topk": [
        dict(block_n=512, radix_bits=8, num_warps=4, resident_max=0, sample=0),
        # two reads of the row (a binned count, then a write): the best point of 2026-11-29
        dict(block_n=1024, radix_bits=8, num_warps=4, resident_max=0, sample=128, candidates=512, row_reads=2),
        # one banded read
        dict(block_n=1024, radix_bits=8, num_warps=8, resident_max=0, sample=2048, candidates=2048, row_reads=1),
        dict(block_n=2048, radix_bits=8, num_warps=8, resident_max=0, sample=2048, candidates=2048, row_reads=1),
        dict(block_n=1024, radix_bits=8, num_warps=4, resident_max=0, sample=2048, candidates=2048, row_reads=1),
        dict(block_n=1024, radix_bits=8, num_warps=8, resident_max=0, sample=1024, candidates=4096, row_reads=1),
        dict(block_n=1024, radix_bits=8, num_warps=8, resident_max=0, sample=1024, candidates=2048, row_reads=1),
        dict(block_n=2048, radix_bits=8, num_warps=16, resident_max=0, sample=2048, candidates=4096, row_reads=1),
        dict(block_n=512, radix_bits=8, num_warps=4, resident_max=0, sample=512, candidates=4096, row_reads=1),
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--spec", type=Path, default=Path("specs/deepseek_v32.toml"))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--only", choices=list(SHAPES), action="append", help="benchmark only these kernels")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks need a CUDA GPU")
    spec = dsagen.load_spec(args.spec)
    gpu = get_gpu("nvidia-h200")
    kernels = dsagen.build(spec)
    rows = []
    selected = args.only or list(SHAPES)
    for name, (S, SKV) in SHAPES.items():
        if name not in selected:
            continue
        rows.append(bench.bench_kernel(kernels, name, gpu, S, SKV))
        print(bench.format_table(rows[-1:]).splitlines()[-1], flush=True)
    sweep = []
    if args.sweep:
        for name, points in SWEEP.items():
            if name not in selected:
                continue
            for point in points:
                try:
                    k2 = dsagen.build(spec, schedules={name: point})
                    r = bench.bench_kernel(k2, name, gpu, *SHAPES[name])
                    sweep.append(r)
                    print(f"sweep {name} {point}: {r.ms:.3f} ms ({r.pct_of_roofline:.1f}% of roofline)", flush=True)
                except Exception as exc:  # a schedule that fails is reported, not fatal
                    print(f"sweep {name} {point}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"targets-{datetime.date.today().isoformat()}.json"
    payload = json.loads(bench.to_json(rows))
    payload["sweep"] = [json.loads(bench.to_json([r]))["results"][0] for r in sweep]
    path.write_text(json.dumps(payload, indent=1))
    print(bench.format_table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
