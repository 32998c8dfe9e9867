"""Time per step and bytes on the wire of dsagen.distributed's sharded DSA steps.

Run under torchrun (one process per GPU, NCCL):

    torchrun --nproc-per-node 4 benchmarks/distributed_bench.py --spec specs/deepseek_v32_serving.toml \\
        --modes decode --batch 128 --context 32768

or on the CPU with gloo, starting the ranks itself (tiny shapes; the Triton interpreter or TVM's
llvm kernels: the times say nothing about a GPU, the bytes are exact):

    python benchmarks/distributed_bench.py --spawn 2 --device cpu --backend tvm

Modes: rows (prefill, query rows split: indexer + top-k, indices all-gathered), keys (prefill,
keys split round robin: indexer + top-k per shard, exact merge, partial attention, LSE merge),
decode (paged caches split round robin: one decode step), train (the sequence split: sparse
attention forward and backward, KV all-gathered, dkv reduce-scattered). Each prints, on rank 0,
the median time per step (the slowest rank's), the bytes each rank received per step and per
token. The spec must have a [cache] section for decode, a bf16 indexer for train; without --spec
each mode takes a small spec of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dsagen  # noqa: E402
from dsagen.cache_formats import MLA_FORMATS, pack_index_pages  # noqa: E402
from dsagen.distributed import (Sharding, count_wire_bytes, key_sharded_attention, key_sharded_select,  # noqa: E402
                                row_sharded_select, sharded_decode, sharded_sparse_attention)

MODES = ("rows", "keys", "decode", "train")


def small_spec(mode: str) -> dsagen.Spec:
    """A spec small enough for the CPU: fp8 serving caches for decode, bf16 elsewhere."""
    if mode == "decode":
        return dsagen.Spec(indexer=dsagen.IndexerSpec(heads=4, head_dim=32, dtype="fp8_e4m3"),
                           topk=dsagen.TopKSpec(k=16), attention=dsagen.AttentionSpec(heads=4, qk_dim=576, v_dim=512),
                           cache=dsagen.CacheSpec(page_size=16))
    return dsagen.Spec(indexer=dsagen.IndexerSpec(heads=4, head_dim=32, dtype="bf16"), topk=dsagen.TopKSpec(k=16),
                       attention=dsagen.AttentionSpec(heads=4, qk_dim=64, v_dim=48))


def seeded(seed: int) -> torch.Generator:
    """Host-side draws (the same on every device), moved to the device after."""
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(gen, *shape, device, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device)


# ------------------------------------------------------------------------------------------------
# one step per mode: (step function, query tokens per step)

def rows_step(kernels, args, rank, world, device):
    ix, S, SKV = kernels.spec.indexer, args.queries, args.context
    g = seeded(1)
    rows = Sharding.contiguous(S, world)
    n = rows.sizes[rank]
    dtype = torch.float8_e4m3fn if ix.dtype == "fp8_e4m3" else torch.bfloat16
    q = randn(g, n, ix.heads, ix.head_dim, device=device).to(dtype)
    k = randn(g, SKV, ix.head_dim, device=device).to(dtype)
    w = randn(g, n, ix.heads, device=device)
    ke = (torch.arange(n, device=device) + rows.starts[rank] + SKV - S + 1).int()
    ks = torch.zeros_like(ke)
    return lambda: row_sharded_select(kernels, q, k, None, w, ks, ke, rows), S


def keys_step(kernels, args, rank, world, device):
    ix, at, S, SKV = kernels.spec.indexer, kernels.spec.attention, args.queries, args.context
    g = seeded(2)
    keys = Sharding.round_robin(SKV, world)
    n = keys.sizes[rank]
    dtype = torch.float8_e4m3fn if ix.dtype == "fp8_e4m3" else torch.bfloat16
    q = randn(g, S, ix.heads, ix.head_dim, device=device).to(dtype)
    k = randn(g, n, ix.head_dim, device=device).to(dtype)
    w = randn(g, S, ix.heads, device=device)
    aq = randn(g, S, at.heads, at.qk_dim, device=device).bfloat16()
    kv = randn(g, n, at.qk_dim, device=device).bfloat16()
    ke = (torch.arange(S, device=device) + SKV - S + 1).int()
    ks = torch.zeros_like(ke)

    def step():
        sel = key_sharded_select(kernels, q, k, None, w, ks, ke, keys)
        return key_sharded_attention(kernels, aq, kv, sel.mine)
    return step, S


def decode_step(kernels, args, rank, world, device):
    spec = kernels.spec
    ix, at, page = spec.indexer, spec.attention, spec.cache.page_size
    fmt = MLA_FORMATS[spec.cache.mla_format]
    B, next_n = args.batch, args.next_n
    g = seeded(3)
    local = -(-args.context // world)  # tokens per request on this rank, at most
    blocks = -(-(local + next_n) // page)
    n_pages = B * blocks
    table = torch.randperm(n_pages, generator=g).int().reshape(B, blocks).to(device)
    keys = (torch.randn(n_pages * page, ix.head_dim, generator=g) * 20).clamp(-448, 448).to(torch.float8_e4m3fn)
    index_cache = pack_index_pages(keys, torch.ones(n_pages * page), page).to(device)
    mla_cache = torch.zeros(n_pages, page, 1, fmt.bytes_per_token, dtype=torch.uint8, device=device)
    kernels.mla_cache_write(randn(g, n_pages * page, at.qk_dim, device=device).bfloat16(),
                            torch.arange(n_pages * page, dtype=torch.int32, device=device), mla_cache)
    q = randn(g, B, next_n, at.heads, at.qk_dim, device=device).bfloat16()
    index_q = randn(g, B, next_n, ix.heads, ix.head_dim, device=device, scale=8).to(torch.float8_e4m3fn)
    weights = randn(g, B * next_n, ix.heads, device=device)
    lens = torch.full((B,), args.context, dtype=torch.int32, device=device)
    return lambda: sharded_decode(kernels, q, mla_cache, index_q, index_cache, weights, lens, table), B * next_n


def train_step(kernels, args, rank, world, device):
    at, S, k = kernels.spec.attention, args.queries, kernels.spec.topk.k
    g = seeded(4)
    seq = Sharding.contiguous(S, world)
    n = seq.sizes[rank]
    q = randn(g, n, at.heads, at.qk_dim, device=device).bfloat16().requires_grad_()
    kv = randn(g, n, at.qk_dim, device=device).bfloat16().requires_grad_()
    pos = torch.arange(n) + seq.starts[rank]  # causal: each token selects k of the tokens before it
    idx = (torch.rand(n, k, generator=g) * (pos[:, None] + 1)).long().clamp(max=S - 1).int().to(device)
    d_out = randn(g, n, at.heads, at.v_dim, device=device).bfloat16()

    def step():
        q.grad = kv.grad = None
        out, _ = sharded_sparse_attention(kernels, q, kv, idx, seq)
        out.backward(d_out)
    return step, S


STEPS = {"rows": rows_step, "keys": keys_step, "decode": decode_step, "train": train_step}


# ------------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, steps: int, device) -> tuple[float, int]:
    """(median seconds per step over ranks' slowest, bytes this rank received per step)."""
    step()  # warm-up: resolve, compile, load
    times = []
    with count_wire_bytes() as wire:
        for _ in range(steps):
            sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest), wire.received // steps


def describe(spec: dsagen.Spec) -> str:
    ix, at = spec.indexer, spec.attention
    return (f"indexer {ix.heads}x{ix.head_dim} {ix.dtype}, k={spec.topk.k}, attention {at.heads} heads "
            f"{at.qk_dim}/{at.v_dim}" + (f", pages of {spec.cache.page_size}" if spec.cache else ""))


def spec_for(mode: str, args) -> dsagen.Spec | None:
    if args.spec is None:
        return small_spec(mode)
    spec = dsagen.load_spec(args.spec)
    if mode == "decode" and spec.cache is None:
        return None
    if mode == "train" and spec.indexer.dtype != "bf16":
        return None
    return spec


def run(rank: int, world: int, args) -> None:
    if args.device == "cpu":
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    rows = []
    for mode in args.modes:
        spec = spec_for(mode, args)
        if spec is None:
            if rank == 0:
                print(f"{mode}: skipped (the spec has no [cache] section / no bf16 indexer)")
            continue
        kernels = dsagen.build(spec, backend=args.backend)
        step, tokens = STEPS[mode](kernels, args, rank, world, device)
        seconds, received = measure(step, args.steps, device)
        rows.append({"mode": mode, "world": world, "backend": args.backend, "device": device.type,
                     "ms_per_step": seconds * 1e3, "bytes_received_per_rank": received,
                     "bytes_per_query_token": received / max(tokens, 1), "query_tokens": tokens,
                     "queries": args.queries, "context": args.context, "batch": args.batch, "next_n": args.next_n,
                     "spec": describe(spec)})
    if rank == 0:
        print(f"{'mode':<8}{'world':>6}{'ms/step':>12}{'bytes/rank/step':>18}{'bytes/query token':>20}")
        for r in rows:
            print(f"{r['mode']:<8}{r['world']:>6}{r['ms_per_step']:>12.3f}{r['bytes_received_per_rank']:>18,}"
                  f"{r['bytes_per_query_token']:>20,.0f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


def spawned(rank: int, world: int, store: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        run(rank, world, args)
    finally:
        dist.destroy_process_group()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", help="a spec file (default: a small spec per mode)")
    p.add_argument("--backend", choices=("triton", "tvm"), default="triton")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: NCCL, one GPU per rank; cpu: gloo")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--queries", type=int, default=8, help="query tokens (rows, keys, train)")
    p.add_argument("--context", type=int, default=64, help="keys (rows, keys), tokens per request (decode)")
    p.add_argument("--batch", type=int, default=2, help="decode requests")
    p.add_argument("--next-n", type=int, default=2, help="decode query tokens per request")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--spawn", type=int, default=0, help="start this many gloo ranks here (CPU) instead of torchrun")
    p.add_argument("--json", help="write the rows as JSON here (rank 0)")
    args = p.parse_args(argv)
    if args.queries > args.context:
        p.error("--queries must be <= --context (the queries are the last tokens)")
    if args.spawn and args.device != "cpu":
        p.error("--spawn starts gloo ranks on the CPU: add --device cpu, or use torchrun for GPUs")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.spawn:
        import tempfile

        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(spawned, args=(args.spawn, os.path.join(tmp, "store"), args), nprocs=args.spawn, join=True)
        return
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        run(dist.get_rank(), dist.get_world_size(), args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
