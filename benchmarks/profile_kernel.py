"""Launch one dsagen kernel a few times at its reference shape, for a profiler to catch the last launch.

    ncu -k regex:_sparse_attention_kernel -s 3 -c 1 --set full python benchmarks/profile_kernel.py sparse_attention

The schedule is the one build() resolves (the tuned database), or --schedule '{"block_n": 64, ...}'.
Inputs come from dsagen.workloads, as in the benchmarks; nothing is timed here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsagen  # noqa: E402
from dsagen.ops import get_op  # noqa: E402
from dsagen.workloads import workload  # noqa: E402

SHAPES = {"sparse_attention": (4096, 8192), "indexer": (4096, 32768), "topk": (4096, 32768),
          "indexer_topk": (4096, 32768),
          # decode (specs/deepseek_v32_serving.toml): S = B requests of next_n = 2 tokens, SKV = context
          "sparse_decode": (128, 32768), "paged_indexer": (128, 32768), "decode_topk": (2, 131072)}
DECODE_SPEC = Path(__file__).resolve().parents[1] / "specs" / "deepseek_v32_serving.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", choices=list(SHAPES))
    ap.add_argument("--spec", type=Path, default=None, help="default: the V3.2 spec (the serving spec for decode "
                    "kernels)")
    ap.add_argument("--schedule", type=json.loads, default=None, help="JSON object of knobs (default: resolved)")
    ap.add_argument("--launches", type=int, default=4)
    args = ap.parse_args()
    if args.spec is None:
        args.spec = DECODE_SPEC if get_op(args.kernel).needs_cache else Path(__file__).resolve().parents[1] / "specs" / "deepseek_v32.toml"
    spec = dsagen.load_spec(args.spec)
    kernels = dsagen.build(spec, schedules={args.kernel: args.schedule} if args.schedule else None)
    S, SKV = SHAPES[args.kernel]
    inputs = workload(args.kernel).inputs(spec, S, SKV, "cuda", 0)
    call = workload(args.kernel).call_shape(S, SKV)
    print(f"{args.kernel} S={S} SKV={SKV} schedule {kernels.resolve(args.kernel, *call, 'cuda').point}")
    for _ in range(args.launches):
        kernels.launch(args.kernel, inputs)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
