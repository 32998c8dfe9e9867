"""Decode kernels at the H200 records' decode shapes, beside naive PyTorch in the same run, and one whole
decode step replayed from a CUDA graph.

    python benchmarks/decode_targets.py --out DIR

Sparse FP8 decode: B=128 requests x s_q=2, k=2048, 32K context, page 64, at H=128, 64, 32 and 16.
Paged indexer: B=128, next_n=2, H=64, 32K context. Decode top-k: 4 rows x 128K and 256 rows x 32K.
Each kernel is checked against the float64 reference on sampled rows before it is timed
(dsagen.bench), eagerly with CUDA events and again as CUDA-graph replays (how a decode step runs).
Writes decode-<date>.json.
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
from dsagen.workloads import workload  # noqa: E402
from dsagen.ops.paged_indexer_workload import naive_paged_indexer, paged_indexer_inputs, paged_indexer_reference  # noqa: E402
from dsagen.timing import capture_cuda_graph, cuda_events_ms, cuda_graph_ms  # noqa: E402
from dsagen.verify import assert_close  # noqa: E402


def with_heads(spec, heads: int):
    return dataclasses.replace(spec, attention=dataclasses.replace(spec.attention, heads=heads))


def decode_step_ms(kernels, B: int, context: int) -> dict:
    """The composed step (paged indexer -> decode top-k -> sparse decode) eager, graph-replayed and compiled,
    on caches of B requests x `context` tokens written by the cache writer."""
    spec = kernels.spec
    q_idx, index_cache, w, context_lens, table = workload("paged_indexer").inputs(spec, B, context, "cuda", 0)
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
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(kernels.decode)(*args).graph_break_count
    compiled = torch.compile(kernels.decode, fullgraph=True)
    compiled_same = all(torch.equal(a, b) for a, b in zip(eager, compiled(*args)))
    return {"B": B, "next_n": next_n, "context": context, "heads": spec.attention.heads,
            "graph_replay_equals_eager": same, "compile_graph_breaks": breaks,
            "compiled_equals_eager": compiled_same,
            "compiled_ms": cuda_events_ms(lambda: compiled(*args), warmup=10, rep=50),
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
    rows, steps, graph_ms = [], [], {}

    def timed(kernels, kernel, S, SKV, label):
        """The eager row (CUDA events, beside naive PyTorch) and the CUDA-graph replay time."""
        rows.append(bench.bench_kernel(kernels, kernel, gpu, S, SKV))
        graph_ms[label] = bench.bench_kernel(kernels, kernel, gpu, S, SKV, naive=False, graph=True).ms
        print(label, bench.format_table(rows[-1:]).splitlines()[-1], f"| graph replay {graph_ms[label]:.4f} ms",
              flush=True)

    for heads in (128, 64, 32, 16):
        timed(dsagen.build(with_heads(spec, heads)), "sparse_decode", 128, 32768, f"sparse_decode H={heads}")
    kernels = dsagen.build(spec)
    timed(kernels, "paged_indexer", 128, 32768, "paged_indexer B=128 next_n=2")
    # next_n = 4 (the workload's is 2): the same kernel, its inputs made here, checked, then timed
    inputs4 = paged_indexer_inputs(spec, 128, 32768, "cuda", 0, next_n=4)
    logits4 = kernels.paged_indexer(*inputs4)
    b = torch.arange(0, 128, 37, device="cuda")
    r = (b[:, None] * 4 + torch.arange(4, device="cuda")).reshape(-1)
    check4 = assert_close("indexer.logits.fp8_e4m3", logits4[r], paged_indexer_reference(
        inputs4[0][b], inputs4[1], inputs4[2][r], inputs4[3][b], inputs4[4][b]))
    graph_ms["paged_indexer B=128 next_n=4"] = cuda_graph_ms(lambda: kernels.paged_indexer(*inputs4))
    next_n4 = {"ms": cuda_events_ms(lambda: kernels.paged_indexer(*inputs4)),
               "graph_ms": graph_ms["paged_indexer B=128 next_n=4"],
               "naive_ms": cuda_events_ms(lambda: naive_paged_indexer(*inputs4), warmup=3, rep=10),
               "check_rms_ratio": check4, "schedule": kernels.resolve("paged_indexer", 512, 32768).point}
    print("paged_indexer B=128 next_n=4", next_n4, flush=True)
    timed(kernels, "decode_topk", 2, 131072, "decode_topk 4 rows x 128K")
    timed(kernels, "decode_topk", 128, 32768, "decode_topk 256 rows x 32K")
    try:
        steps.append(decode_step_ms(kernels, 128, 32768))
        print("decode step", steps[-1], flush=True)
    except Exception as exc:  # the step's timing is reported, not fatal to the kernel numbers
        print(f"decode step FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode-{datetime.date.today().isoformat()}.json"
    payload = json.loads(bench.to_json(rows))
    payload["decode_step"] = steps
    payload["graph_replay_ms"] = graph_ms
    payload["paged_indexer_next_n4"] = next_n4
    path.write_text(json.dumps(payload, indent=1))
    print(bench.format_table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
