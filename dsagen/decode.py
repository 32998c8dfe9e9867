"""The glue of a decode step, in plain torch (no host sync, so a CUDA graph captures it): each
query row's visible window, and the page-table transform from token positions to cache slots."""
from __future__ import annotations

import torch


def decode_windows(context_lens: torch.Tensor, next_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ks, ke) int32 [B * next_n]: query j of request b sees positions [0, context_len - next_n + j + 1)."""
    j = torch.arange(next_n, device=context_lens.device, dtype=torch.int32)
    ke = (context_lens.to(torch.int32)[:, None] - next_n + j[None, :] + 1).clamp_min(0).reshape(-1)
    return torch.zeros_like(ke), ke


def positions_to_slots(positions: torch.Tensor, block_table: torch.Tensor, page_size: int,
                       next_n: int) -> torch.Tensor:
    """Token positions [B * next_n, k] of each request (-1 = none) -> cache slots [B, next_n, k]
    (page * page_size + offset through the request's block table), -1 kept."""
    rows, k = positions.shape
    batch = rows // next_n
    pos = positions.long()
    valid = pos >= 0
    page_of = (pos.clamp_min(0) // page_size).clamp_max(block_table.shape[1] - 1)
    request = torch.arange(batch, device=positions.device).repeat_interleave(next_n)[:, None]
    slots = block_table.long()[request, page_of] * page_size + pos.clamp_min(0) % page_size
    return torch.where(valid, slots, -1).to(torch.int32).reshape(batch, next_n, k)
