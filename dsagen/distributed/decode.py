"""Decode context parallelism: the paged caches split round robin across ranks.

Token t of a request lives on rank t % W at local position t // W; each rank holds its own pages
of both caches and its own block table (local positions -> its pages). The query side (q, index_q,
index_weights and the global context_lens) is the same on every rank. One step:

1. each rank runs the paged indexer over its tokens. Query j of request b sees the global
   positions < V_j = context_len - next_n + j + 1, which are c_j = ceil((V_j - r) / W) local
   positions on rank r; c_j does not follow the kernels' one-length-per-request rule (it grows by
   0 or 1 per query), so the indexer runs with the local length c_last + next_n - 1 (row j then
   sees c_last + j >= c_j positions) and the positions >= c_j are set to -inf with torch ops;
2. the decode top-k of those rows, emitted through an identity block table so that its "slots"
   are local positions; a position >= c_j (picked only when the window holds fewer than k
   candidates) is dropped; exact: it sits after every position of the real window and holds -inf,
   so the real window's selection is unchanged (ties go to the lower position);
3. the exact global top-k over every rank's candidates (dsagen.distributed.select), each winner
   mapped back to its owner's local position, and through the owner's block table to a cache slot;
4. the sparse FP8 decode of each rank over its own selected slots, and the LSE merge of the W
   partials (a rank that holds none of a query's keys gives out 0, lse +inf: no mass).

No host sync: every length is a tensor op on the device; the sizes are the tensors' shapes.
On one rank none of this runs: the windows are the kernels' own and the plain kernels do the step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..decode import decode_windows, positions_to_slots
from .attention import merge_attention_over_ranks
from .comm import group_rank
from .select import merge_topk_over_ranks, selection_keys
from .sharding import round_robin_count


class ShardedDecodeOutput(NamedTuple):
    out: torch.Tensor  # [B, s_q, H, Dv] bf16, merged over ranks (the same on every rank), or this rank's partial
    lse: torch.Tensor  # [B, s_q, H] fp32, natural log, +inf where no key was selected (by this rank, if partial)
    # [B, s_q, k] int32 global token positions selected, -1 padded: best first over several ranks, in the
    # decode top-k's order on one rank; None when sharded_decode(positions=False)
    positions: torch.Tensor | None
    slots: torch.Tensor  # [B, s_q, k] int32 this rank's cache slots of them, -1 where another rank holds it


def local_visible(context_lens: torch.Tensor, next_n: int, rank: int, world: int) -> torch.Tensor:
    """int64 [B * next_n]: the local positions query row b * next_n + j sees on `rank`."""
    _, ke = decode_windows(context_lens, next_n)
    return round_robin_count(ke, rank, world)


def widened_lengths(context_lens: torch.Tensor, next_n: int, rank: int, world: int) -> torch.Tensor:
    """int32 [B]: the per-request length that makes the kernels' window of every query row cover
    its local window: c_last + next_n - 1 (row j then sees c_last + j >= c_j)."""
    last = round_robin_count(context_lens.long().clamp_min(0), rank, world)
    return (last + next_n - 1).to(torch.int32)


def mask_past(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """-inf at every column >= the row's visible count."""
    cols = torch.arange(logits.shape[1], device=logits.device)
    return torch.where(cols[None, :] < visible[:, None], logits, -torch.inf)


def identity_table(n_req: int, max_blocks: int, device) -> torch.Tensor:
    """A block table whose entries are the block numbers, so that a slot is the position itself."""
    return torch.arange(max_blocks, dtype=torch.int32, device=device).expand(n_req, max_blocks).contiguous()


def local_candidates(kernels, index_q, index_cache, index_weights, context_lens, block_table, rank: int,
                     world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(local positions int32 [B * next_n, k], values fp32): this rank's exact top-k of each query
    row's local window, -1 / -inf where it holds fewer than k keys."""
    n_req, next_n = index_q.shape[:2]
    k = kernels.spec.topk.k
    rows = n_req * next_n
    if block_table.shape[1] == 0 or rows == 0:  # no page on this rank
        return (torch.full((rows, k), -1, dtype=torch.int32, device=index_q.device),
                torch.full((rows, k), -torch.inf, device=index_q.device))
    widened = widened_lengths(context_lens, next_n, rank, world)
    visible = local_visible(context_lens, next_n, rank, world)
    logits = kernels.paged_indexer(index_q, index_cache, index_weights, widened, block_table)
    logits = mask_past(logits, visible)
    table = identity_table(n_req, block_table.shape[1], block_table.device)
    positions = kernels.decode_topk(logits, widened, table).reshape(rows, k)
    positions = torch.where(positions.long() < visible[:, None], positions, -1)
    values = logits.gather(1, positions.long().clamp_min(0))
    return positions, torch.where(positions >= 0, values, -torch.inf)


def whole_cache_select(kernels, index_q, index_cache, index_weights, context_lens, block_table):
    """(positions, slots) [B, s_q, k] of one rank holding the whole cache: the plain paged indexer
    and decode top-k (its windows are the queries' own), emitted as positions through an identity
    table, then mapped through the block table to slots."""
    n_req, next_n = index_q.shape[:2]
    k = kernels.spec.topk.k
    if block_table.shape[1] == 0 or n_req * next_n == 0:
        empty = torch.full((n_req, next_n, k), -1, dtype=torch.int32, device=index_q.device)
        return empty, empty
    logits = kernels.paged_indexer(index_q, index_cache, index_weights, context_lens, block_table)
    table = identity_table(n_req, block_table.shape[1], block_table.device)
    positions = kernels.decode_topk(logits, context_lens, table).reshape(n_req * next_n, k)
    slots = positions_to_slots(positions, block_table, index_cache.shape[1], next_n)
    return positions.reshape(n_req, next_n, k), slots


def sharded_decode_select(kernels, index_q, index_cache, index_weights, context_lens, block_table, group=None):
    """(global positions int32 [B, s_q, k], this rank's cache slots int32 [B, s_q, k]): the exact
    decode top-k over the round-robin-sharded caches, ties to the lower global position."""
    rank, world = group_rank(group)
    if world == 1:
        return whole_cache_select(kernels, index_q, index_cache, index_weights, context_lens, block_table)
    n_req, next_n = index_q.shape[:2]
    k = kernels.spec.topk.k
    positions, values = local_candidates(kernels, index_q, index_cache, index_weights, context_lens, block_table,
                                         rank, world)
    keys = selection_keys(values, torch.where(positions >= 0, positions.long() * world + rank, -1))
    chosen = merge_topk_over_ranks(keys, k, group)  # [rows, k] global positions
    g = chosen.long()
    mine = torch.where((g >= 0) & (g % world == rank), torch.div(g, world, rounding_mode="floor"), -1)
    slots = positions_to_slots(mine, block_table, index_cache.shape[1], next_n)
    return chosen.reshape(n_req, next_n, k), slots


def sharded_decode(kernels, q, mla_cache, index_q, index_cache, index_weights, context_lens, block_table,
                   group=None, sm_scale: float | None = None, merge: bool = True,
                   positions: bool = True, attn_sink: torch.Tensor | None = None) -> ShardedDecodeOutput:
    """One decode step with the paged caches split round robin over the ranks of `group`.

    Arguments as DSAKernels.decode: q [B, s_q, H, qk_dim] bf16, index_q [B, s_q, Hi, Di] fp8,
    index_weights [B * s_q, Hi] fp32 and context_lens [B] int32 (global lengths, the new tokens
    included) are the same on every rank; mla_cache, index_cache and block_table [B, max_blocks]
    are this rank's (its pages, indexed by local position t // W). merge=False returns this rank's
    partial (out, lse) instead of the merged one (merge_attention merges partials).
    attn_sink [H] fp32 (DeepSeek-V4's sink per head) applies once, after the merge (out *= 1 / (1 +
    exp(attn_sink[h] - lse)), lse unchanged); a partial returned with merge=False carries none (pass
    the sink to merge_attention instead).

    On one rank the partial is the whole and nothing is exchanged or merged. positions=False (the
    field is then None) makes that the plain decode() step itself; positions=True costs one small
    torch pass over [B, s_q, k] beside it (the top-k emits positions, which the block table maps
    to slots). Over several ranks the positions come out of the merge either way."""
    if kernels.spec.cache is None:
        raise ValueError("sharded_decode needs a spec with a [cache] section (page size and cache formats)")
    if q.dim() != 4 or index_q.dim() != 4 or q.shape[:2] != index_q.shape[:2]:
        raise ValueError(f"q [B, s_q, H, qk_dim] and index_q [B, s_q, Hi, Di] must agree on [B, s_q], got "
                         f"{list(q.shape)} and {list(index_q.shape)}")
    _, world = group_rank(group)
    if world == 1 and not positions and attn_sink is None:  # the whole cache, no positions asked: the plain decode step
        out, lse, slots = kernels.decode(q, mla_cache, index_q, index_cache, index_weights, context_lens,
                                         block_table, sm_scale)
        return ShardedDecodeOutput(out, lse, None, slots)
    chosen, slots = sharded_decode_select(kernels, index_q, index_cache, index_weights, context_lens,
                                          block_table, group)
    one_rank = world == 1  # the partial is the whole: the decode kernel applies the sink itself
    out, lse = kernels.sparse_decode(q, mla_cache, slots, sm_scale, attn_sink if one_rank and merge else None)
    if merge:
        out, lse = merge_attention_over_ranks(out, lse, group, kernels, None if one_rank else attn_sink)
    return ShardedDecodeOutput(out, lse, chosen if positions else None, slots)
