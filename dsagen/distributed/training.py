"""Training with the sequence split across ranks (contiguous, even or uneven shards).

Each rank holds the query tokens of its shard and the key/value rows of the same tokens. The
attention (and the indexer loss) of its queries needs every key: the rows are all-gathered in the
forward, and in the backward the full-length gradient of each rank is reduce-scattered so that
each rank gets the sum over every rank's queries for its own rows. `GatherRows` is that pair as a
torch.autograd.Function; the kernels' own backward ops (sparse_attention_bwd, indexer_loss_bwd)
run between them, so loss.backward() on every rank gives each rank the gradients of its shard.
Every rank must run the backward (it is a collective), also a rank whose loss does not use it.
On a group of one rank the kernels run on the rows as given: no gather, no autograd Function.
"""
from __future__ import annotations

import torch

from .comm import all_gather_rows, group_rank, reduce_scatter_rows
from .sharding import Sharding


class GatherRows(torch.autograd.Function):
    """x [sizes[rank], ...] -> [sum(sizes), ...] (every rank's rows); backward: the incoming
    gradient summed over ranks (in fp32), this rank's rows, in x's dtype."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = tuple(sizes), group
        return all_gather_rows(x, ctx.sizes, group)

    @staticmethod
    def backward(ctx, grad):
        summed = reduce_scatter_rows(grad.float().contiguous(), ctx.sizes, ctx.group)
        return summed.to(grad.dtype), None, None


def gather_rows(x: torch.Tensor, sharding: Sharding, group=None) -> torch.Tensor:
    """Every rank's rows of a contiguous sharding (differentiable: GatherRows); on one rank, x."""
    rank, world = group_rank(group)
    _check_rows(sharding, world, rank, x, "x")
    return x if world == 1 else GatherRows.apply(x, sharding.sizes, group)


def _check_rows(sharding: Sharding, world: int, rank: int, x: torch.Tensor, name: str) -> None:
    if not isinstance(sharding, Sharding) or sharding.kind != "contiguous":
        raise ValueError(f"sharding must be a contiguous dsagen.distributed.Sharding, got {sharding!r}")
    if sharding.world != world:
        raise ValueError(f"sharding splits over {sharding.world} ranks but the group has {world}")
    if x.shape[0] != sharding.sizes[rank]:
        raise ValueError(f"{name} has {x.shape[0]} rows but this rank's shard is {sharding.sizes[rank]} rows")


def sharded_sparse_attention(kernels, q, kv, indices, sharding: Sharding, group=None,
                             sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [S_local, H, Dv], lse [S_local, H]) of this rank's queries over the selected rows of the
    whole sequence. q [S_local, H, Dqk] and kv [S_local, Dqk]: this rank's tokens (`sharding` of
    the sequence); indices [S_local, k]: global kv rows. kv is all-gathered; differentiable in q and
    kv (dkv reduce-scattered). On one rank: the plain kernel, nothing gathered."""
    rank, world = group_rank(group)
    _check_rows(sharding, world, rank, q, "q")
    return kernels.sparse_attention(q, gather_rows(kv, sharding, group), indices, sm_scale)


def sharded_indexer_loss(kernels, iq, ik, weights, aq, akv, alse, indices, sharding: Sharding, group=None,
                         sm_scale: float | None = None, akv_full: torch.Tensor | None = None):
    """(loss [S_local], index_lse [S_local]) of V3.2's indexer loss for this rank's queries.

    iq [S_local, Hi, Di], weights [S_local, Hi], aq, alse: this rank's queries; ik [S_local, Di]
    and akv [S_local, Dqk]: this rank's tokens; indices [S_local, k]: global rows. ik is gathered
    differentiably (d_ik reduce-scattered); the attention's akv is a constant target, gathered
    without a graph, unless akv_full (every rank's rows, e.g. gathered for the attention already)
    is given, when akv is not read. On one rank: the plain kernel, nothing gathered."""
    rank, world = group_rank(group)
    _check_rows(sharding, world, rank, iq, "iq")
    if akv_full is None:
        akv_full = akv if world == 1 else all_gather_rows(constant(akv), sharding.sizes, group)
    ik_full = gather_rows(ik, sharding, group)
    return kernels.indexer_loss(iq, ik_full, weights, constant(aq), constant(akv_full), constant(alse), indices,
                                sm_scale)


def constant(x: torch.Tensor) -> torch.Tensor:
    """x without its graph (the loss's attention target): detached only where it has one."""
    return x.detach() if x.requires_grad else x
