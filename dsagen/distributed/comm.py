"""The collectives the sharded kernels exchange data with, on torch.distributed (NCCL on GPUs, gloo
on CPUs), and a counter of the bytes they move.

Every exchange is an all-gather or a reduce-scatter of one tensor. Uneven shards are padded to the
largest one (the sizes are host integers every rank knows). `count_wire_bytes()` counts, per rank,
the bytes it receives from the other ranks: (world - 1) x the padded shard for both collectives
(what a ring moves into each rank; the doc's per-token figures are these).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class WireBytes:
    """Bytes this rank received from other ranks, and the collectives that moved them."""

    received: int = 0
    collectives: int = 0


_counters: list[WireBytes] = []


@contextlib.contextmanager
def count_wire_bytes():
    """with count_wire_bytes() as wire: ... ; wire.received, wire.collectives."""
    counter = WireBytes()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def _record(shard: torch.Tensor, world: int) -> None:
    for counter in _counters:
        counter.received += (world - 1) * shard.numel() * shard.element_size()
        counter.collectives += 1


def group_rank(group=None) -> tuple[int, int]:
    """(rank, world size) of this process in `group` (None: the default group); a clear error when
    torch.distributed is not initialized. No group is not taken as one rank: a torchrun rank that
    forgot to init would then treat its shard as the whole problem, silently."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("dsagen.distributed needs torch.distributed initialized "
                           "(torch.distributed.init_process_group, or torchrun; one process: a group of one rank)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the process group it was given")
    return rank, dist.get_world_size(group)


def _all_gather_flat(out: torch.Tensor, x: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


def _reduce_scatter_flat(out: torch.Tensor, x: torch.Tensor, group) -> None:
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x, group=group)


def all_gather_stacked(x: torch.Tensor, group=None) -> torch.Tensor:
    """[world, *x.shape]: every rank's x (the same shape on every rank), in rank order."""
    _, world = group_rank(group)
    x = x.contiguous()
    if world == 1 or x.numel() == 0:
        return x[None].expand(world, *x.shape).clone()
    flat = x.new_empty(world * x.numel())  # the concatenated form: every backend takes it
    _record(x, world)
    _all_gather_flat(flat, x.reshape(-1), group)
    return flat.view(world, *x.shape)


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    pad = x.new_zeros((rows, *x.shape[1:]))
    pad[:x.shape[0]] = x
    return pad


def _check_rows(name: str, x: torch.Tensor, sizes, rank: int) -> None:
    if x.shape[0] != sizes[rank]:
        raise ValueError(f"{name} has {x.shape[0]} rows but this rank's shard is {sizes[rank]} rows")


def all_gather_rows(x: torch.Tensor, sizes, group=None) -> torch.Tensor:
    """[sum(sizes), ...]: the contiguous shards of every rank (rank r gives sizes[r] rows), in
    rank order. Shards are padded to the largest for the exchange."""
    rank, world = group_rank(group)
    if len(sizes) != world:
        raise ValueError(f"sizes has {len(sizes)} entries for a group of {world} ranks")
    _check_rows("x", x, sizes, rank)
    stacked = all_gather_stacked(_padded(x, max(sizes)), group)
    return torch.cat([stacked[r, :n] for r, n in enumerate(sizes)])


def reduce_scatter_rows(x: torch.Tensor, sizes, group=None) -> torch.Tensor:
    """[sizes[rank], ...]: this rank's rows of the sum over ranks of x [sum(sizes), ...]."""
    rank, world = group_rank(group)
    if len(sizes) != world or x.shape[0] != sum(sizes):
        raise ValueError(f"x has {x.shape[0]} rows; sizes {tuple(sizes)} describe {sum(sizes)} over {len(sizes)} "
                         f"ranks (the group has {world})")
    if world == 1:
        return x.clone()
    width = max(sizes)
    starts = [sum(sizes[:r]) for r in range(world)]
    stacked = torch.stack([_padded(x[s:s + n], width) for s, n in zip(starts, sizes)])
    out = x.new_empty((width, *x.shape[1:]))
    _record(out, world)
    _reduce_scatter_flat(out, stacked.reshape(world * width, *x.shape[1:]), group)
    return out[:sizes[rank]]
