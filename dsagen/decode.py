"""The glue of a decode step, in plain torch (no host sync, so a CUDA graph captures it): each
query row's visible window, and the page-table transform from token positions to cache slots."""
from __future__ import annotations

import torch


def decode_windows(context_lens: torch.Tensor, next_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ks, ke) int32 [B * next_n]: query j of request b sees positions [0, context_len - next_n + j + 1)."""
    j = torch.arange(next_n, device=context_lens.device, dtype=torch.int32)
    ke = (context_lens.to(torch.int32)[:, None] - next_n + j[None, :] + 1).clamp_min(0).reshape(-1)
    return torch.zeros_like(ke), ke


INT32_MAX = 2**31 - 1


def page_slots(entries: torch.Tensor, offsets: torch.Tensor, page_size: int) -> torch.Tensor:
    """int64 cache slots entry * page_size + offset, computed without wrapping; -1 where the entry
    is negative or the slot does not fit an int32 (no int32 slot could name it)."""
    slots = entries.long() * page_size + offsets
    return torch.where((entries >= 0) & (slots <= INT32_MAX), slots, -1)


def positions_to_slots(positions: torch.Tensor, block_table: torch.Tensor, page_size: int,
                       next_n: int) -> torch.Tensor:
    """Token positions [B * next_n, k] of each request (-1 = none) -> cache slots [B, next_n, k]
    (page * page_size + offset through the request's block table). -1 where a position has no
    slot: -1 itself, a position past the table, a negative entry, a slot past int32."""
    rows, k = positions.shape
    batch = rows // next_n
    width = block_table.shape[1]
    if width == 0:  # no page to map a position to
        return positions.new_full((batch, next_n, k), -1, dtype=torch.int32)
    pos = positions.long()
    page_of = pos.clamp_min(0) // page_size
    in_table = (pos >= 0) & (page_of < width)
    request = torch.arange(batch, device=positions.device).repeat_interleave(next_n)[:, None]
    entries = block_table[request, page_of.clamp_max(width - 1)]
    slots = page_slots(entries, pos.clamp_min(0) % page_size, page_size)
    return torch.where(in_table, slots, -1).to(torch.int32).reshape(batch, next_n, k)
