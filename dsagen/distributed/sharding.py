"""How a sequence of rows (query tokens or keys) is split over the ranks of a process group.

Two layouts, both known on the host (sizes are Python integers, so no collective needs a size
exchange and no host sync happens):

- contiguous: rank r holds rows [starts[r], starts[r] + sizes[r]); sizes may be uneven, and zero;
  the default split gives the first `total % world` ranks one row more (torch.tensor_split's).
- round robin: row g lives on rank g % world at local position g // world (a decode KV cache
  appended token by token across ranks).

The position maps work on tensors with torch ops on the rows' device; -1 (no row) stays -1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("contiguous", "round_robin")


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def round_robin_count(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """int64: how many rows g < x satisfy g % world == rank (0 for x <= 0): the local length of a
    global prefix of x rows on `rank`."""
    return torch.div(x.long() - rank + world - 1, world, rounding_mode="floor").clamp_min(0)


@dataclass(frozen=True)
class Sharding:
    """`total` rows over `len(sizes)` ranks, laid out as `kind` ("contiguous" or "round_robin")."""

    kind: str
    sizes: tuple[int, ...]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.sizes, tuple) or not self.sizes:
            raise ValueError(f"sizes must be a non-empty tuple of rows per rank, got {self.sizes!r}")
        for r, n in enumerate(self.sizes):
            _check_count(f"sizes[{r}]", n, 0)
        if self.kind == "round_robin":
            want = round_robin_sizes(self.total, self.world)
            if self.sizes != want:
                raise ValueError(f"round_robin sizes of {self.total} rows over {self.world} ranks are {want}, "
                                 f"got {self.sizes}")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, total: int, world: int, sizes=None) -> "Sharding":
        """Rows in rank order; `sizes` (one per rank, summing to total) or the tensor_split default."""
        _check_count("total", total, 0)
        _check_count("world", world, 1)
        if sizes is None:
            sizes = tuple(total // world + (1 if r < total % world else 0) for r in range(world))
        sizes = tuple(sizes)
        if len(sizes) != world:
            raise ValueError(f"sizes has {len(sizes)} entries but world is {world}: one per rank")
        if sum(sizes) != total:
            raise ValueError(f"sizes {sizes} sum to {sum(sizes)}, not total={total}")
        return cls("contiguous", sizes)

    @classmethod
    def round_robin(cls, total: int, world: int) -> "Sharding":
        """Row g on rank g % world at local position g // world."""
        _check_count("total", total, 0)
        _check_count("world", world, 1)
        return cls("round_robin", round_robin_sizes(total, world))

    # -- sizes --------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def starts(self) -> tuple[int, ...]:
        """The first global row of each rank (contiguous layout)."""
        out, at = [], 0
        for n in self.sizes:
            out.append(at)
            at += n
        return tuple(out)

    def check_rank(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}), got {rank!r}")
        return rank

    def shard(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s rows of a global tensor (first dimension = rows)."""
        self.check_rank(rank)
        if x.shape[0] != self.total:
            raise ValueError(f"x has {x.shape[0]} rows but the sharding holds {self.total}")
        if self.kind == "round_robin":
            return x[rank::self.world].contiguous()  # a shard owns its memory
        start = self.starts[rank]
        return x[start:start + self.sizes[rank]]

    # -- position maps (tensors, -1 kept) ---------------------------------------------------
    def to_global(self, local: torch.Tensor, rank: int) -> torch.Tensor:
        """int64 global rows of `rank`'s local rows; -1 (or any negative) gives -1."""
        self.check_rank(rank)
        local = local.long()
        if self.kind == "round_robin":
            g = local * self.world + rank
        else:
            g = local + self.starts[rank]
        return torch.where(local >= 0, g, -1)

    def owner(self, g: torch.Tensor) -> torch.Tensor:
        """int64 rank holding each global row; -1 for a negative row."""
        g = g.long()
        if self.kind == "round_robin":
            r = g % self.world
        else:
            ends = torch.tensor(self.starts[1:] + (self.total,), device=g.device)
            # the first rank whose end passes g holds it (an empty rank's end never passes a row)
            r = torch.searchsorted(ends, g, right=True).clamp_max(self.world - 1)
        return torch.where(g >= 0, r, -1)

    def to_local(self, g: torch.Tensor) -> torch.Tensor:
        """int64 local position of each global row on its owner; -1 for a negative row."""
        g = g.long()
        if self.kind == "round_robin":
            p = torch.div(g, self.world, rounding_mode="floor")
        else:
            starts = torch.tensor(self.starts, device=g.device)
            p = g - starts[self.owner(g).clamp_min(0)]
        return torch.where(g >= 0, p, -1)

    def local_window(self, ks: torch.Tensor, ke: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 (ks, ke) over `rank`'s local rows for global key windows [ks, ke): the windows are
        clamped to [0, total) as the kernels clamp them (ks >= ke: empty), then mapped to the local
        rows they hold, which form one local interval in both layouts."""
        self.check_rank(rank)
        lo = ks.long().clamp(0, self.total)
        hi = torch.maximum(ke.long().clamp(0, self.total), lo)
        if self.kind == "round_robin":
            lo_l, hi_l = round_robin_count(lo, rank, self.world), round_robin_count(hi, rank, self.world)
        else:
            start, n = self.starts[rank], self.sizes[rank]
            lo_l, hi_l = (lo - start).clamp(0, n), (hi - start).clamp(0, n)
        return lo_l.to(torch.int32), hi_l.to(torch.int32)


def round_robin_sizes(total: int, world: int) -> tuple[int, ...]:
    """Rows per rank of a round-robin layout: ceil((total - r) / world) for rank r."""
    return tuple(max(0, (total - r + world - 1) // world) for r in range(world))
