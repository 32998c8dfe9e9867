"""What FlashMLA's DeepSeek-V4 interface adds to sparse MLA, as dsagen serves it.

The decode (flash_mla_with_kvcache) runs the sparse decode kernel itself on either cache format,
the window cache, the per-request top-k lengths and the sink in the same launch. What is left here
are the pieces the prefill path composes on the host, as torch ops on the inputs' device with no
host sync:

- per-query top-k lengths: slots past a query's length become -1 before a kernel reads them;
- the attention sink: out * 1 / (1 + exp(sink[h] - lse)) in fp32, lse unchanged.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

BF16 = torch.bfloat16


class Selection(NamedTuple):
    """One cache and the slots [b, s_q, k] a query token selects in it (block * page + offset)."""

    cache: torch.Tensor  # [blocks, page_size, 1, bytes_per_token] uint8
    slots: torch.Tensor  # [b, s_q, k] int32

    @property
    def n_slots(self) -> int:
        return self.cache.shape[0] * self.cache.shape[1]

    @property
    def width(self) -> int:
        return self.slots.shape[-1]

    def is_empty(self) -> bool:
        """No slot can be valid: no column, or a cache without tokens."""
        return self.width == 0 or self.n_slots == 0


def cut_to_lengths(slots: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """slots [b, ..., k] with the entries at positions >= lengths[b] set to -1 (a negative length
    keeps none, one past k keeps all); the caller's tensor is not written."""
    if lengths is None:
        return slots
    position = torch.arange(slots.shape[-1], device=slots.device, dtype=torch.int32)
    keep = position < lengths.reshape(-1, *[1] * (slots.dim() - 1))
    return torch.where(keep, slots, -1)


def apply_attn_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """out [..., h, d] * 1 / (1 + exp(sink[h] - lse)) in fp32, as bf16: a sink of -inf leaves out,
    +inf zeroes it. A (query, head) without a valid key (lse +inf) keeps its out of 0, whatever
    the sink (+inf - +inf would be NaN)."""
    lse32 = lse.float()
    keep = torch.where(lse32 == math.inf, 1.0, torch.sigmoid(lse32 - sink.float()))
    return (out.float() * keep[..., None]).to(BF16)
