"""Fused indexer + top-k against indexer-then-top-k: time and peak GPU memory, same run.

    python benchmarks/fused_indexer_topk.py [--out benchmarks/results] [--S 4096] [--SKV 32768 131072]
        [--schedule '{"block_m": 16, "block_h": 1, "block_n": 64}' ...]

V3.2 spec (fp8 indexer, 64 heads x 128, k = 2048), S queries at the end of an SKV causal context
(inputs of dsagen.workloads). Both paths are checked first on sampled rows against the float64
reference logits (top-k contract within the fp8 indexer's tolerance). Peak memory is
torch.cuda.max_memory_allocated over one call, inputs excluded.
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
from dsagen import bench, timing, workloads  # noqa: E402


def peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--SKV", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--schedule", type=json.loads, action="append", default=None,
                    help="fused schedule to time, a JSON object of knobs (repeatable; default: the resolved one)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU")
    spec = dsagen.load_spec(Path(__file__).resolve().parents[1] / "specs" / "deepseek_v32.toml")
    kernels = dsagen.build(spec)
    fused_builds = [dsagen.build(spec, schedules={"indexer_topk": s}) for s in args.schedule] if args.schedule \
        else [kernels]
    rows = []
    for skv in args.SKV:
        q, k, k_scale, w, ks, ke = workloads.workload("indexer").inputs(spec, args.S, skv, "cuda", 0)
        inputs = (q, k, k_scale, w, ks, ke)
        checked_rows = workloads.sample_rows(args.S, 8, 0)

        def unfused():
            return kernels.topk(kernels.indexer(q, k, k_scale, w, ks, ke), ks, ke)

        print("unfused top-k:", workloads.workload("indexer_topk").check(spec, inputs, unfused(), checked_rows), flush=True)
        unfused_ms, unfused_peak = timing.cuda_events_ms(unfused, warmup=25, rep=200), peak_bytes(unfused)
        for build in fused_builds:
            def fused(build=build):
                return build.indexer_topk(q, k, k_scale, w, ks, ke)

            point = build.resolve("indexer_topk", args.S, skv).point  # what this shape runs (tuned or not)
            print("fused", point, workloads.workload("indexer_topk").check(spec, inputs, fused(), checked_rows), flush=True)
            row = {"S": args.S, "SKV": skv, "fused_schedule": point,
                   "unfused_ms": unfused_ms, "fused_ms": timing.cuda_events_ms(fused, warmup=25, rep=200),
                   "unfused_peak_MiB": unfused_peak / 2**20, "fused_peak_MiB": peak_bytes(fused) / 2**20}
            rows.append(row)
            print(json.dumps(row), flush=True)
    payload = {"environment": bench.environment(), "results": rows,
               "schedules": {"indexer": kernels.resolve("indexer", args.S, args.SKV[0]).point,
                             "topk": kernels.resolve("topk", args.S, args.SKV[0]).point}}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"fused-indexer-topk-{datetime.date.today().isoformat()}.json"
        path.write_text(json.dumps(payload, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
