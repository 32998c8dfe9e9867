"""Exact top-k selection over keys or query rows split across ranks.

The single-process top-k (`topk`, `decode_topk`) selects per row the k largest logits of its window
over the order NaN > +inf > finite > -inf (every NaN equal, -0 equal to +0), ties to the LOWER key
position (docs/numerics.md). Each rank's local top-k follows the same order over its own keys, and
both layouts keep global order among one rank's keys (a larger local position is a larger global
one), so the global top-k is a subset of the union of the local ones: merging the W x k local
candidates by (value, then lower global position) gives exactly the single-process selection.

A candidate crosses the wire as one int64 selection key: the float's order-preserving 32-bit image
above 31 bits of (2^31 - 1 - global position), so that a larger key is the better candidate and one
integer top-k does the merge; -1 is "no candidate".
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..pipelines import fused_selection
from .comm import all_gather_rows, all_gather_stacked, group_rank
from .sharding import Sharding

POSITION_BITS = 31
POSITION_MASK = (1 << POSITION_BITS) - 1
NAN_KEY = 0xFFFFFFFF  # above +inf's image, 0xFF800000


def ordered_image(values: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32): an order-preserving image of fp32 values with -0 == +0 and every NaN
    mapped to the top (above +inf), so that integer order is the top-k's order."""
    x = values.float() + 0.0  # -0 + 0 = +0
    bits = x.view(torch.int32).long() & 0xFFFFFFFF
    negative = bits >= 0x80000000
    image = torch.where(negative, 0xFFFFFFFF - bits, bits + 0x80000000)
    return torch.where(torch.isnan(x), NAN_KEY, image)


def selection_keys(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys of candidates (values fp32, global positions; a negative position is no
    candidate, key -1): larger key = selected first (larger value, then lower position)."""
    pos = positions.long()
    key = (ordered_image(values) << POSITION_BITS) | (POSITION_MASK - pos.clamp(0, POSITION_MASK))
    return torch.where(pos >= 0, key, -1)


def key_positions(keys: torch.Tensor) -> torch.Tensor:
    """The global positions of selection keys (-1 for key -1)."""
    return torch.where(keys >= 0, POSITION_MASK - (keys & POSITION_MASK), -1)


def merge_topk(keys: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [rows, k] global positions, best first, -1 padded: the top k of candidate keys
    [rows, C] (from selection_keys; C >= k or fewer candidates than k, padded)."""
    rows, width = keys.shape
    if width < k:
        keys = torch.cat([keys, keys.new_full((rows, k - width), -1)], dim=1)
    best = torch.topk(keys, k, dim=1, sorted=True).values
    return key_positions(best).to(torch.int32)


def local_topk(kernels, logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor):
    """(positions int32 [S, k], values fp32 [S, k]): the generated top-k of each row's window
    [ks, ke) with the values it selected (-inf where the position is -1)."""
    positions = kernels.topk(logits, ks, ke)
    values = logits.gather(1, positions.long().clamp_min(0)) if logits.shape[1] else \
        logits.new_full(positions.shape, -torch.inf)
    return positions, torch.where(positions >= 0, values, -torch.inf)


def merge_topk_over_ranks(keys: torch.Tensor, k: int, group=None) -> torch.Tensor:
    """int32 [rows, k] global positions of the exact global top-k: every rank's candidate keys
    [rows, k] all-gathered (8 bytes a candidate) and merged."""
    stacked = all_gather_stacked(keys, group)  # [W, rows, k]
    return merge_topk(stacked.permute(1, 0, 2).reshape(keys.shape[0], -1), k)


# ------------------------------------------------------------------------------------------------
# keys split across ranks

class KeySelection(NamedTuple):
    # [S, k] int32 global key positions, -1 padded: best first (value, then lower position) over several
    # ranks; on one rank in the plain top-k's order (a row's order is no part of the top-k's contract)
    indices: torch.Tensor
    owner: torch.Tensor  # [S, k] int32 rank holding each selected key, -1 where no key
    local: torch.Tensor  # [S, k] int32 its local position on that rank, -1 where no key
    mine: torch.Tensor  # [S, k] int32 this rank's local positions, -1 where another rank (or none) holds it


def locate(indices: torch.Tensor, sharding: Sharding, rank: int) -> KeySelection:
    """The owner and local position of each selected global key, and this rank's share."""
    owner = sharding.owner(indices)
    local = sharding.to_local(indices)
    mine = torch.where(owner == rank, local, -1)
    return KeySelection(indices, owner.to(torch.int32), local.to(torch.int32), mine.to(torch.int32))


def key_sharded_select(kernels, index_q, index_k, index_k_scale, weights, ks, ke, sharding: Sharding,
                       group=None) -> KeySelection:
    """The exact global top-k of every query row when the keys are split across ranks.

    Every rank holds all query rows (index_q [S, Hi, Di], weights [S, Hi], global windows ks, ke
    [S] int32) and its own keys (index_k [n_local, Di], index_k_scale [n_local] or None), laid out
    by `sharding` (contiguous or round robin). Each rank runs the generated indexer and top-k over
    its keys (windows mapped to local rows), then the candidates are merged exactly. The result is
    the same on every rank. On one rank this is the plain selection (dsa()'s indexer + top-k, or the
    fused kernel): indices in the top-k kernel's order, not the merge's best-first order."""
    rank, world = group_rank(group)
    _check_sharding(sharding, world, rank, index_k, "index_k")
    k = kernels.spec.topk.k
    if world == 1:  # every key is here: the plain selection, nothing to merge
        if not index_k.shape[0]:
            return whole_selection(no_selection(ks.shape[0], k, ks.device))
        return whole_selection(select_rows(kernels, index_q, index_k, index_k_scale, weights, ks, ke))
    ks_l, ke_l = sharding.local_window(ks, ke, rank)
    if index_k.shape[0]:
        logits = kernels.indexer(index_q, index_k, index_k_scale, weights, ks_l, ke_l)
        positions, values = local_topk(kernels, logits, ks_l, ke_l)
    else:  # an empty shard offers no candidate
        positions = no_selection(ks.shape[0], k, ks.device)
        values = torch.full((ks.shape[0], k), -torch.inf, device=ks.device)
    keys = selection_keys(values, sharding.to_global(positions, rank))
    return locate(merge_topk_over_ranks(keys, k, group), sharding, rank)


def no_selection(rows: int, k: int, device) -> torch.Tensor:
    """int32 [rows, k] of -1: the selection of rows that see no key."""
    return torch.full((rows, k), -1, dtype=torch.int32, device=device)


def whole_selection(indices: torch.Tensor) -> KeySelection:
    """The KeySelection of one rank holding every key: local positions are the global ones (the
    same tensor in indices, local and mine) and the owner is rank 0 wherever a key is selected
    (-1 stays -1: one clamp)."""
    return KeySelection(indices, indices.clamp_max(0), indices, indices)


def _check_sharding(sharding: Sharding, world: int, rank: int, rows: torch.Tensor, name: str) -> None:
    if not isinstance(sharding, Sharding):
        raise ValueError(f"sharding must be a dsagen.distributed.Sharding, got {type(sharding).__name__}")
    if sharding.world != world:
        raise ValueError(f"sharding splits over {sharding.world} ranks but the group has {world}")
    if rows.shape[0] != sharding.sizes[rank]:
        raise ValueError(f"{name} has {rows.shape[0]} rows but this rank's shard is {sharding.sizes[rank]} rows")


# ------------------------------------------------------------------------------------------------
# query rows split across ranks

class RowSelection(NamedTuple):
    local: torch.Tensor  # [S_local, k] int32: this rank's rows, global key positions, -1 padded
    indices: torch.Tensor | None  # [S, k] int32: every rank's rows in rank order (None: gather=False)


def select_rows(kernels, index_q, index_k, index_k_scale, weights, ks, ke) -> torch.Tensor:
    """indices [S, k] of one rank's query rows against the whole key set: the fused indexer + top-k
    when the spec asks for it and the backend has it (as dsa() chooses), else indexer then top-k."""
    if fused_selection(kernels):
        return kernels.indexer_topk(index_q, index_k, index_k_scale, weights, ks, ke)
    return kernels.topk(kernels.indexer(index_q, index_k, index_k_scale, weights, ks, ke), ks, ke)


def row_sharded_select(kernels, index_q, index_k, index_k_scale, weights, ks, ke, rows: Sharding,
                       group=None, gather: bool = True) -> RowSelection:
    """Prefill with the query rows split across ranks (contiguous `rows`, even or uneven): each
    rank selects for its own rows (index_q, weights, ks, ke: its rows; index_k, index_k_scale: the
    whole key set) and, with gather=True, the int32 indices of every rank are all-gathered (4 k
    bytes a query row), so every rank returns the full [S, k] table too. On one rank this is the
    plain selection (dsa()'s indexer + top-k, or the fused kernel), with indices the same tensor as
    local."""
    rank, world = group_rank(group)
    if rows.kind != "contiguous":
        raise ValueError(f"rows must be a contiguous sharding of the query rows, got {rows.kind}")
    _check_sharding(rows, world, rank, index_q, "index_q")
    k = kernels.spec.topk.k
    if index_q.shape[0]:
        local = select_rows(kernels, index_q, index_k, index_k_scale, weights, ks, ke)
    else:
        local = no_selection(0, k, index_q.device)
    if not gather:
        return RowSelection(local, None)
    # one rank holds every row: the table is its own (the same tensor), nothing to gather
    return RowSelection(local, local if world == 1 else all_gather_rows(local, rows.sizes, group))
