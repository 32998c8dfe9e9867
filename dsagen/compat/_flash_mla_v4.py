"""What FlashMLA's DeepSeek-V4 interface adds to sparse MLA, composed on dsagen's kernels, which
take neither sinks, a second cache nor the MODEL1 cache format yet. Everything here is torch
ops on the inputs' device with no host sync, exact up to the roundings named:

- per-request top-k lengths: slots past a request's length become -1 before a kernel reads them;
- the window cache: a second partial attention over it, merged with the first through their
  natural-log LSEs (dsagen.distributed.merge), as one softmax over both selections;
- the attention sink: out * 1 / (1 + exp(sink[h] - lse)) in fp32 after the merge, lse unchanged;
- the MODEL1 cache: only the selected rows are gathered and dequantized to bf16 (what FlashMLA's
  kernel reads), then the prefill sparse attention kernel runs over them. This gathers
  b * s_q * topk rows of 1 KiB: it is exact, not the fast path.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..cache_formats import MLABlockFormat, block_regions
from ..distributed.merge import merge_attention

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


def merged(partials: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (out, lse) from partials over disjoint selections of the same queries: the single one
    as it is, several merged through their LSEs in fp32 (out fp32)."""
    if len(partials) == 1:
        return partials[0]
    return merge_attention([out.float() for out, _ in partials], [lse for _, lse in partials])


# -- the MODEL1 cache: gather, dequantize, attend -----------------------------------------------

def dequantize_block_rows(data: torch.Tensor, exponents: torch.Tensor, fmt: MLABlockFormat) -> torch.Tensor:
    """Gathered data rows [..., latent fp8 | rope bf16] (uint8) and their ue8m0 scale bytes
    [..., n_scales] -> bf16 rows [..., latent + rope]. fp8 * 2^e is exact in fp32 (a NaN scale
    byte or fp8 code gives NaN), then rounded once to bf16, as FlashMLA's kernel reads it."""
    codes = data[..., :fmt.latent_dim].contiguous().view(torch.float8_e4m3fn).float()
    scales = exponents.contiguous().view(torch.float8_e8m0fnu).float()
    latent = (codes.unflatten(-1, (fmt.n_scales, fmt.group)) * scales[..., None]).flatten(-2)
    rope = data[..., fmt.latent_dim:].contiguous().view(BF16)
    return torch.cat([latent.to(BF16), rope], dim=-1)


def gather_block_rows(selection: Selection, fmt: MLABlockFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 rows [b, s_q, k, latent + rope], valid [b, s_q, k]) of a selection in a block-format
    cache: a slot is valid in [0, blocks * page_size). Invalid slots read slot 0's row (never
    attended to), or zeros where the cache has no token; only the selected rows are read."""
    slots, page = selection.slots, selection.cache.shape[1]
    valid = (slots >= 0) & (slots < selection.n_slots)
    width = fmt.latent_dim + fmt.rope_dim
    if selection.n_slots == 0:
        return torch.zeros((*slots.shape, width), dtype=BF16, device=slots.device), valid
    slot = torch.where(valid, slots, 0).long()
    block, offset = slot // page, slot % page
    data, scales = block_regions(selection.cache, fmt)
    return dequantize_block_rows(data[block, offset], scales[block, offset, :fmt.n_scales], fmt), valid


def gathered_rows(selections: list[Selection], fmt: MLABlockFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv [b * s_q * K, latent + rope] bf16, indices [b * s_q, K] int32) over the selections'
    columns side by side (K their total width): query token r's column j is row r * K + j of kv,
    -1 where its slot is invalid."""
    parts = [gather_block_rows(selection, fmt) for selection in selections]
    rows = torch.cat([r for r, _ in parts], dim=2)
    valid = torch.cat([v for _, v in parts], dim=2)
    b, s_q, k = valid.shape
    position = torch.arange(b * s_q * k, dtype=torch.int32, device=valid.device).reshape(b * s_q, k)
    return rows.reshape(b * s_q * k, -1), torch.where(valid.reshape(b * s_q, k), position, -1)


def block_format_attention(kernels, q: torch.Tensor, selections: list[Selection], fmt: MLABlockFormat,
                           sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, s_q, h, latent + rope] bf16, lse [b, s_q, h]) over every selection in one softmax:
    the prefill sparse attention kernel (qk_dim = v_dim = latent + rope) over the gathered rows.
    This copies the selected rows (b * s_q * K of them): exact, not the fast path."""
    b, s_q, h, d = q.shape
    kv, indices = gathered_rows(selections, fmt)
    q_rows = q.reshape(b * s_q, h, d)
    q_rows = q_rows if q_rows.stride(-1) == 1 else q_rows.contiguous()
    out, lse = kernels.sparse_attention(q_rows, kv, indices, sm_scale)
    return out.reshape(b, s_q, h, d), lse.reshape(b, s_q, h)


# -- the V3.2 cache: one decode kernel per selection ----------------------------------------------

def row_format_attention(runs: list[tuple[object, Selection]], q: torch.Tensor,
                         sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse [b, s_q, h]) over every selection: the sparse decode kernel over each (kernels,
    selection) in place (the kernel reads any page size and block stride from the cache), merged
    through the LSEs (out fp32 where several are merged, the kernel's bf16 otherwise)."""
    return merged([kernels.sparse_decode(q, selection.cache, selection.slots, sm_scale)
                   for kernels, selection in runs])
