"""dsa() under torch.compile(fullgraph=True) and under CUDA-graph capture, against eager, on a GPU.

    python benchmarks/compile_graph_check.py --out DIR [--S 4096 --SKV 8192]

The V3.2 spec at a prefill shape (the S queries at the end of a causal context of SKV keys): the
outputs of eager, compiled and graph-replayed dsa() must be identical, and the three are timed
(CUDA events, median) so the cost of each path shows. Writes compile-graph-<date>.json.
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
from dsagen.bench import environment  # noqa: E402
from dsagen.workloads import workload  # noqa: E402
from dsagen.timing import capture_cuda_graph, cuda_events_ms  # noqa: E402


def dsa_inputs(spec, S: int, SKV: int, seed: int = 0):
    q_idx, k_idx, k_scale, w, ks, ke = workload("indexer").inputs(spec, S, SKV, "cuda", seed)
    q, kv, _, _ = workload("sparse_attention").inputs(spec, S, SKV, "cuda", seed + 1)
    return (q, kv, q_idx, k_idx, k_scale, w, ks, ke)


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--spec", type=Path, default=Path("specs/deepseek_v32.toml"))
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--SKV", type=int, default=8192)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this check needs a CUDA GPU")
    spec = dsagen.load_spec(args.spec)
    kernels = dsagen.build(spec)
    print("modules:", kernels.prepare(args.S, args.SKV, "cuda"), flush=True)
    inputs = dsa_inputs(spec, args.S, args.SKV)
    eager = kernels.dsa(*inputs)
    torch.cuda.synchronize()

    from torch import _dynamo

    explained = _dynamo.explain(kernels.dsa)(*inputs)
    compiled_fn = torch.compile(kernels.dsa, fullgraph=True)
    compiled = compiled_fn(*inputs)
    torch.cuda.synchronize()

    static = [t.clone() for t in inputs]
    graph, captured = capture_cuda_graph(lambda: kernels.dsa(*static))
    graph.replay()
    torch.cuda.synchronize()

    result = {
        "environment": environment(),
        "shape": {"S": args.S, "SKV": args.SKV, "spec": str(args.spec)},
        "graph_breaks": explained.graph_break_count,
        "graphs": explained.graph_count,
        "compiled_equals_eager": same(compiled, eager),
        "graph_replay_equals_eager": same(captured, eager),
        "ms": {
            "eager": cuda_events_ms(lambda: kernels.dsa(*inputs), warmup=10, rep=50),
            "compiled": cuda_events_ms(lambda: compiled_fn(*inputs), warmup=10, rep=50),
            "graph_replay": cuda_events_ms(graph.replay, warmup=10, rep=50),
        },
    }
    print(json.dumps(result, indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compile-graph-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    if not (result["compiled_equals_eager"] and result["graph_replay_equals_eager"] and not result["graph_breaks"]):
        sys.exit("error: compiled or graph-replayed dsa() differs from eager, or the trace broke")


if __name__ == "__main__":
    main()
