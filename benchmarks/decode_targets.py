"""Decode kernels at the H200 targets-file shapes, beside naive PyTorch in the same run, and one whole
decode step replayed from a CUDA graph.

    python benchmarks/decode_targets.py --out DIR

Sparse FP8 decode: B=128 requests x s_q=2, k=2048, 32K context, page 64, at H=128, 64, 32 and 16.
Paged indexer: B=128, next_n=2, H=64, 32K context. Each kernel is checked against the float64
reference on sampled rows before it is timed (dsagen.bench). Writes decode-<date>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsagen  # noqa: E402
from dsagen import bench  # noqa: E402
from dsagen.gpus import get_gpu  # noqa: E402
from dsagen.ops import get_op  # noqa: E402
from dsagen.timing import capture_cuda_graph, cuda_events_ms  # noqa: E402


def with_heads(spec, heads: int):
    return dataclasses.replace(spec, attention=dataclasses.replace(spec.attention, heads=heads))


def decode_step_ms(kernels, B: int, context: int) -> dict:
    """The composed step (paged indexer -> top-k -> slots -> sparse decode) eager and graph-replayed,
    on caches of B requests x `context` tokens written by the cache writer."""
    spec = kernels.spec
    q_idx, index_cache, w, context_lens, table = get_op("paged_indexer").inputs(spec, B, context, "cuda", 0)
    page, next_n = spec.cache.page_size, q_idx.shape[1]
    n_slots = index_cache.shape[0] * page
    mla_cache = torch.empty(index_cache.shape[0], page, 1, 656, dtype=torch.uint8, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    for start in range(0, n_slots, 1 << 20):  # write every slot with the writer kernel, in chunks
        n = min(1 << 20, n_slots - start)
        rows = torch.randn(n, 576, device="cuda", generator=gen).bfloat16()
        kernels.mla_cache_write(rows, torch.arange(start, start + n, device="cuda", dtype=torch.int32), mla_cache)
    q = torch.randn(B, next_n, spec.attention.heads, 576, device="cuda", generator=gen).bfloat16()
    args = (q, mla_cache, q_idx, index_cache, w, context_lens, table)
    eager = kernels.decode(*args)
    graph, captured = capture_cuda_graph(lambda: kernels.decode(*args), warmup=1)
    graph.replay()
    torch.cuda.synchronize()
    same = all(torch.equal(a, b) for a, b in zip(eager, captured))
    return {"B": B, "next_n": next_n, "context": context, "heads": spec.attention.heads,
            "graph_replay_equals_eager": same,
            "eager_ms": cuda_events_ms(lambda: kernels.decode(*args), warmup=10, rep=50),
            "graph_ms": cuda_events_ms(graph.replay, warmup=10, rep=50)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--spec", type=Path, default=Path("specs/deepseek_v32_serving.toml"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks need a CUDA GPU")
    spec = dsagen.load_spec(args.spec)
    gpu = get_gpu("nvidia-h200")
    rows, steps = [], []
    for heads in (128, 64, 32, 16):
        kernels = dsagen.build(with_heads(spec, heads))
        rows.append(bench.bench_kernel(kernels, "sparse_decode", gpu, 128, 32768))
        print(f"H={heads}", bench.format_table(rows[-1:]).splitlines()[-1], flush=True)
    kernels = dsagen.build(spec)
    rows.append(bench.bench_kernel(kernels, "paged_indexer", gpu, 128, 32768))
    print(bench.format_table(rows[-1:]).splitlines()[-1], flush=True)
    try:
        steps.append(decode_step_ms(kernels, 128, 32768))
        print("decode step", steps[-1], flush=True)
    except Exception as exc:  # the step's timing is reported, not fatal to the kernel numbers
        print(f"decode step FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode-{datetime.date.today().isoformat()}.json"
    payload = json.loads(bench.to_json(rows))
    payload["decode_step"] = steps
    path.write_text(json.dumps(payload, indent=1))
    print(bench.format_table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
