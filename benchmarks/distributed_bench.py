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

--plain also times, in the same process and in turns with the distributed step, the plain
single-process path over the whole problem: the selection dsa() runs (rows), dsa() (keys),
decode() (decode), sparse_attention forward and backward (train); and prints distributed / plain.
Every rank draws the same global inputs from one seed on its device and takes its shard, so on one
rank both paths read the very same tensors and the ratio is what dsagen.distributed costs there
(it should be 1: one rank runs the plain kernels). Decode is timed with positions=False (out and
lse, what an engine asks for). benchmarks/distributed_gpu.sh runs it on one GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, NamedTuple

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


class Draws:
    """Random inputs drawn on the device from one seed: the same tensors on every rank (the same
    device type), so each rank can take its shard of the global inputs and time the plain path
    over all of them."""

    def __init__(self, seed: int, device):
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def randn(self, *shape, scale=1.0, dtype=torch.float32):
        """Normal draws times scale, in dtype (drawn in it where torch can: fp32, bf16)."""
        direct = dtype in (torch.float32, torch.bfloat16)
        x = torch.randn(*shape, generator=self.gen, device=self.device, dtype=dtype if direct else torch.float32)
        return (x if scale == 1.0 else x * scale).to(dtype)

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.gen, device=self.device)

    def randperm(self, n):
        return torch.randperm(n, generator=self.gen, device=self.device)


class Case(NamedTuple):
    """One mode's step on this rank's shard, the plain single-process step over the whole problem
    (the same tensors on one rank), and the query tokens one step serves."""

    distributed: Callable[[], object]
    plain: Callable[[], object]
    tokens: int


def index_dtype(spec: dsagen.Spec):
    return torch.float8_e4m3fn if spec.indexer.dtype == "fp8_e4m3" else torch.bfloat16


def plain_select(kernels, index_q, index_k, index_k_scale, weights, ks, ke):
    """The selection dsa() runs: the fused indexer + top-k when the spec asks for it and the build
    has it, else the indexer then the top-k."""
    if kernels.spec.topk.fused and "indexer_topk" in kernels.kernels():
        return kernels.indexer_topk(index_q, index_k, index_k_scale, weights, ks, ke)
    return kernels.topk(kernels.indexer(index_q, index_k, index_k_scale, weights, ks, ke), ks, ke)


def causal_windows(S: int, SKV: int, device):
    """(ks, ke) int32 [S]: query t is token SKV - S + t and sees the keys up to itself."""
    ke = (torch.arange(S, device=device) + SKV - S + 1).int()
    return torch.zeros_like(ke), ke


def index_inputs(kernels, draws: Draws, S: int, SKV: int):
    ix = kernels.spec.indexer
    dtype = index_dtype(kernels.spec)
    return (draws.randn(S, ix.heads, ix.head_dim, dtype=dtype), draws.randn(SKV, ix.head_dim, dtype=dtype),
            draws.randn(S, ix.heads))


# ------------------------------------------------------------------------------------------------
# one case per mode

def rows_case(kernels, args, rank, world, device) -> Case:
    S, SKV = args.queries, args.context
    q, k, w = index_inputs(kernels, Draws(1, device), S, SKV)
    ks, ke = causal_windows(S, SKV, device)
    rows = Sharding.contiguous(S, world)
    mine = [rows.shard(x, rank) for x in (q, w, ks, ke)]
    return Case(lambda: row_sharded_select(kernels, mine[0], k, None, mine[1], mine[2], mine[3], rows),
                lambda: plain_select(kernels, q, k, None, w, ks, ke), S)


def keys_case(kernels, args, rank, world, device) -> Case:
    at, S, SKV = kernels.spec.attention, args.queries, args.context
    draws = Draws(2, device)
    q, k, w = index_inputs(kernels, draws, S, SKV)
    aq = draws.randn(S, at.heads, at.qk_dim, dtype=torch.bfloat16)
    kv = draws.randn(SKV, at.qk_dim, dtype=torch.bfloat16)
    ks, ke = causal_windows(S, SKV, device)
    keys = Sharding.round_robin(SKV, world)
    k_mine, kv_mine = keys.shard(k, rank), keys.shard(kv, rank)

    def step():
        sel = key_sharded_select(kernels, q, k_mine, None, w, ks, ke, keys)
        return key_sharded_attention(kernels, aq, kv_mine, sel.mine)
    return Case(step, lambda: kernels.dsa(aq, kv, q, k, None, w, ks, ke), S)


def paged_caches(kernels, keys: torch.Tensor, rows: torch.Tensor, draws: Draws):
    """(index_cache, mla_cache, block_table) holding per request its tokens' index keys [B, n, Di]
    (scale 1) and MLA rows [B, n, qk_dim], in shuffled pages."""
    spec = kernels.spec
    page, fmt = spec.cache.page_size, MLA_FORMATS[spec.cache.mla_format]
    B, n = keys.shape[:2]
    blocks = max(1, -(-n // page))
    n_pages = B * blocks
    table = draws.randperm(n_pages).int().reshape(B, blocks)
    pos = torch.arange(n, device=keys.device)
    slots = (table.long()[:, pos // page] * page + pos % page).reshape(-1)
    flat_keys = torch.zeros(n_pages * page, keys.shape[2], device=keys.device).to(keys.dtype)
    flat_keys[slots] = keys.reshape(-1, keys.shape[2])
    scales = torch.ones(n_pages * page, device=keys.device)
    index_cache = pack_index_pages(flat_keys, scales, page)
    mla_cache = torch.zeros(n_pages, page, 1, fmt.bytes_per_token, dtype=torch.uint8, device=keys.device)
    kernels.mla_cache_write(rows.reshape(B * n, -1), slots.int(), mla_cache)
    return index_cache, mla_cache, table


def decode_case(kernels, args, rank, world, device) -> Case:
    """Every request holds --context tokens; rank r holds tokens r, r + W, ... of each (round
    robin). The plain step reads caches of every token; on one rank they are the rank's own."""
    spec = kernels.spec
    ix, at = spec.indexer, spec.attention
    B, next_n, n = args.batch, args.next_n, args.context
    draws = Draws(3, device)
    keys = draws.randn(B, n, ix.head_dim, scale=20.0).clamp(-448, 448).to(torch.float8_e4m3fn)
    rows = draws.randn(B, n, at.qk_dim, dtype=torch.bfloat16)
    q = draws.randn(B, next_n, at.heads, at.qk_dim, dtype=torch.bfloat16)
    index_q = draws.randn(B, next_n, ix.heads, ix.head_dim, scale=8.0, dtype=torch.float8_e4m3fn)
    weights = draws.randn(B * next_n, ix.heads)
    lens = torch.full((B,), n, dtype=torch.int32, device=device)
    whole = paged_caches(kernels, keys, rows, draws)
    mine = whole if world == 1 else paged_caches(kernels, keys[:, rank::world], rows[:, rank::world], draws)
    del keys, rows
    index_cache, mla_cache, table = mine
    # positions=False: what an engine asks for (out and lse); on one rank that is decode() itself
    return Case(lambda: sharded_decode(kernels, q, mla_cache, index_q, index_cache, weights, lens, table,
                                       positions=False),
                lambda: kernels.decode(q, whole[1], index_q, whole[0], weights, lens, whole[2]), B * next_n)


def train_case(kernels, args, rank, world, device) -> Case:
    """Sparse attention forward and backward; each token selects k of the tokens up to itself."""
    at, S, k = kernels.spec.attention, args.queries, kernels.spec.topk.k
    draws = Draws(4, device)
    seq = Sharding.contiguous(S, world)
    q = draws.randn(S, at.heads, at.qk_dim, dtype=torch.bfloat16)
    kv = draws.randn(S, at.qk_dim, dtype=torch.bfloat16)
    pos = torch.arange(S, device=device)
    idx = (draws.rand(S, k) * (pos[:, None] + 1)).long().clamp(max=S - 1).int()
    d_out = draws.randn(S, at.heads, at.v_dim, dtype=torch.bfloat16)
    leaves = {name: x.detach().requires_grad_() for name, x in
              (("q", q), ("kv", kv), ("q_mine", seq.shard(q, rank)), ("kv_mine", seq.shard(kv, rank)))}
    idx_mine, d_out_mine = seq.shard(idx, rank), seq.shard(d_out, rank)

    def step():
        leaves["q_mine"].grad = leaves["kv_mine"].grad = None
        out, _ = sharded_sparse_attention(kernels, leaves["q_mine"], leaves["kv_mine"], idx_mine, seq)
        out.backward(d_out_mine)

    def plain():
        leaves["q"].grad = leaves["kv"].grad = None
        out, _ = kernels.sparse_attention(leaves["q"], leaves["kv"], idx)
        out.backward(d_out)
    return Case(step, plain, S)


CASES = {"rows": rows_case, "keys": keys_case, "decode": decode_case, "train": train_case}


# ------------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(steps_of: list, steps: int, device) -> list[float]:
    """Median seconds per step of each callable (the slowest rank's), timed in turns after one
    warm-up call each (resolve, compile, load), so that drift hits them alike."""
    for step in steps_of:
        step()
    sync(device)
    times = [[] for _ in steps_of]
    for _ in range(steps):
        for step, spent in zip(steps_of, times):
            sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            step()
            sync(device)
            spent.append(time.perf_counter() - t0)
    # on the ranks' device: NCCL reduces only device tensors
    slowest = torch.tensor([statistics.median(t) for t in times], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.tolist()


def wire_bytes(step) -> int:
    """Bytes this rank receives in one call of step."""
    with count_wire_bytes() as wire:
        step()
    return wire.received


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


def run(rank: int, world: int, args, device: torch.device) -> None:
    rows = []
    for mode in args.modes:
        spec = spec_for(mode, args)
        if spec is None:
            if rank == 0:
                print(f"{mode}: skipped (the spec has no [cache] section / no bf16 indexer)")
            continue
        kernels = dsagen.build(spec, backend=args.backend)
        case = CASES[mode](kernels, args, rank, world, device)
        timed = measure([case.distributed, case.plain] if args.plain else [case.distributed], args.steps, device)
        received = wire_bytes(case.distributed)
        row = {"mode": mode, "world": world, "backend": args.backend, "device": device.type,
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "ms_per_step": timed[0] * 1e3, "bytes_received_per_rank": received,
               "bytes_per_query_token": received / max(case.tokens, 1), "query_tokens": case.tokens,
               "queries": args.queries, "context": args.context, "batch": args.batch, "next_n": args.next_n,
               "steps": args.steps, "spec": describe(spec)}
        if args.plain:
            row.update(plain_ms_per_step=timed[1] * 1e3, ratio_to_plain=timed[0] / timed[1])
        rows.append(row)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        report(rows, args)


def report(rows: list[dict], args) -> None:
    plain = f"{'plain ms':>12}{'ratio':>8}" if args.plain else ""
    print(f"{'mode':<8}{'world':>6}{'ms/step':>12}{plain}{'bytes/rank/step':>18}{'bytes/query token':>20}")
    for r in rows:
        plain = f"{r['plain_ms_per_step']:>12.3f}{r['ratio_to_plain']:>8.3f}" if args.plain else ""
        print(f"{r['mode']:<8}{r['world']:>6}{r['ms_per_step']:>12.3f}{plain}{r['bytes_received_per_rank']:>18,}"
              f"{r['bytes_per_query_token']:>20,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def spawned(rank: int, world: int, store: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        run(rank, world, args, torch.device("cpu"))
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
    p.add_argument("--steps", type=int, default=3, help="timed steps per path (after one warm-up call)")
    p.add_argument("--plain", action="store_true",
                   help="also time the plain single-process path over the whole problem (same inputs on one "
                        "rank), in turns with the distributed one, and print their ratio")
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
    if args.device == "cpu":
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    try:
        run(dist.get_rank(), dist.get_world_size(), args, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
