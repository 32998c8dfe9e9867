"""FlashMLA's sparse FP8 decode entry points (`get_mla_metadata`, `flash_mla_with_kvcache` with
`indices`), run by dsagen's kernels for any head count (FlashMLA takes 64 or 128) and any top-k."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._builds import kernels_for


@dataclass
class FlashMLASchedMeta:
    """What `get_mla_metadata` returns and `flash_mla_with_kvcache` takes back. dsagen's kernels
    schedule themselves; this remembers the shapes of the first call, as FlashMLA's does, so a
    reused object with other shapes is an error."""

    config: dict = field(default_factory=dict)


def get_mla_metadata(*args, **kwargs) -> tuple[FlashMLASchedMeta, None]:
    """(a fresh FlashMLASchedMeta, None); the arguments of older FlashMLA versions are accepted."""
    return FlashMLASchedMeta(), None


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table, cache_seqlens, head_dim_v: int,
                           tile_scheduler_metadata: FlashMLASchedMeta, num_splits=None,
                           softmax_scale: float | None = None, causal: bool = False, is_fp8_kvcache: bool = False,
                           indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse FP8 decode: (out [b, s_q, h_q, head_dim_v] bf16, lse [b, h_q, s_q] fp32, natural log).

    q [b, s_q, h_q, 576] bf16; k_cache uint8 or fp8 [blocks, page, 1, 656] (512 fp8 | 4 fp32 scales |
    64 bf16 rope per token); indices [b, s_q, topk] int32 cache slots (block * page + offset), -1 or
    out of range = invalid. A query with no valid index gives out 0 and lse +inf. Only the sparse
    FP8 path is served (indices given, is_fp8_kvcache=True, causal=False), as in FlashMLA.
    """
    if indices is None or not is_fp8_kvcache or causal:
        raise ValueError("dsagen serves flash_mla_with_kvcache's sparse FP8 path only: pass indices, "
                         "is_fp8_kvcache=True and causal=False")
    if head_dim_v != 512:
        raise ValueError(f"head_dim_v={head_dim_v!r}: must be 512 (the V3.2 FP8 cache)")
    if not isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        raise ValueError("tile_scheduler_metadata must come from dsagen.compat.flash_mla.get_mla_metadata()")
    if num_splits is not None:
        raise ValueError("num_splits must be None")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or not isinstance(indices, torch.Tensor) or indices.dim() != 3:
        raise ValueError("q must be [b, s_q, h_q, 576] and indices [b, s_q, topk]")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError("k_cache must be [blocks, page_size, 1, 656]")
    shapes = {"b": q.shape[0], "s_q": q.shape[1], "h_q": q.shape[2], "page": k_cache.shape[1],
              "topk": indices.shape[-1]}
    if tile_scheduler_metadata.config and tile_scheduler_metadata.config != shapes:
        raise ValueError(f"tile_scheduler_metadata was made for {tile_scheduler_metadata.config}, "
                         f"this call has {shapes}: use one metadata object per shape")
    tile_scheduler_metadata.config = shapes
    cache = k_cache.view(torch.uint8) if k_cache.dtype != torch.uint8 else k_cache
    kernels = kernels_for(heads=q.shape[2], qk_dim=q.shape[3], v_dim=head_dim_v, topk=indices.shape[-1],
                          page_size=k_cache.shape[1])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out, lse = kernels.sparse_decode(q, cache, indices, scale)
    return out, lse.transpose(1, 2).contiguous()
