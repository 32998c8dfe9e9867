"""FlashMLA's sparse entry points, run by dsagen's kernels for any head count (FlashMLA takes 64 or
128) and any top-k: the FP8 decode (`get_mla_metadata`, `flash_mla_with_kvcache` with `indices`) and
the bf16 prefill (`flash_mla_sparse_fwd`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..ops.base import check_scale
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


def flash_mla_sparse_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512,
                         attn_sink: torch.Tensor | None = None, topk_length: torch.Tensor | None = None, *,
                         backend: str = "triton") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse prefill attention: (out [s_q, h_q, d_v] bf16, max_logits [s_q, h_q] fp32, lse [s_q, h_q] fp32).

    q [s_q, h_q, d_qk] bf16 (d_qk 576, or 512: no rope part); kv [s_kv, 1, d_qk] bf16; indices
    [s_q, 1, topk] int32 rows of kv, where a value < 0 or >= s_kv is invalid. Over each query's
    valid indices: out = softmax(sm_scale * q . kv) @ kv[:, :d_v], lse its natural-log
    logsumexp and max_logits the largest sm_scale * q . kv. A query with no valid index gives
    out 0, max_logits -inf and lse +inf. topk_length [s_q] int32 (optional): only the first
    topk_length[i] indices of query i count. attn_sink is not supported (None only). Any h_q and
    any topk are accepted (FlashMLA takes h_q 64 or 128). backend (dsagen's, keyword only): the
    kernels to run, "triton" or "tvm".
    """
    if attn_sink is not None:
        raise ValueError("attn_sink is not supported by dsagen's flash_mla_sparse_fwd: pass attn_sink=None "
                         "(supported: q, kv, indices, sm_scale, d_v=512 and topk_length)")
    if isinstance(d_v, bool) or d_v != 512:
        raise ValueError(f"d_v={d_v!r}: must be 512 (V is the first 512 columns of each kv row)")
    if sm_scale is not None:
        check_scale("sm_scale", sm_scale)
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError("q must be a bf16 tensor [s_q, h_q, d_qk]")
    if not isinstance(kv, torch.Tensor) or kv.dim() != 3:
        raise ValueError("kv must be a bf16 tensor [s_kv, h_kv=1, d_qk]")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 3:
        raise ValueError("indices must be an int32 tensor [s_q, h_kv=1, topk]")
    for name, t in (("q", q), ("kv", kv)):
        if t.dtype != torch.bfloat16:
            raise ValueError(f"{name} must be torch.bfloat16, got {t.dtype}")
    if indices.dtype != torch.int32:
        raise ValueError(f"indices must be torch.int32, got {indices.dtype}")
    s_q, h_q, d_qk = q.shape
    if d_qk not in (576, 512):
        raise ValueError(f"q is [s_q, h_q, {d_qk}]: d_qk must be 576 (512 latent + 64 rope) or 512")
    if kv.shape[1] != 1:
        raise ValueError(f"kv has h_kv={kv.shape[1]}: sparse MLA shares one kv head (h_kv must be 1)")
    if kv.shape[2] != d_qk:
        raise ValueError(f"kv's last dimension is {kv.shape[2]} but q's is {d_qk}: they must be equal")
    if indices.shape[0] != s_q or indices.shape[1] != 1:
        raise ValueError(f"indices must be [s_q={s_q}, h_kv=1, topk], got {list(indices.shape)}")
    for name, t in (("kv", kv), ("indices", indices)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, but q is on {q.device}")
    topk = indices.shape[2]
    idx = indices[:, 0, :]
    if topk_length is not None:
        if not isinstance(topk_length, torch.Tensor) or topk_length.dtype != torch.int32 \
                or tuple(topk_length.shape) != (s_q,):
            raise ValueError(f"topk_length must be an int32 tensor [s_q={s_q}] or None")
        if topk_length.device != q.device:
            raise ValueError(f"topk_length is on {topk_length.device}, but q is on {q.device}")
        keep = torch.arange(topk, device=idx.device, dtype=torch.int32)[None, :] < topk_length[:, None]
        idx = torch.where(keep, idx, -1)
    if topk == 0 or kv.shape[0] == 0:  # no index can be valid
        out = torch.zeros((s_q, h_q, d_v), dtype=q.dtype, device=q.device)
        return (out, torch.full((s_q, h_q), -math.inf, device=q.device),
                torch.full((s_q, h_q), math.inf, device=q.device))
    # the kernels take row strides; the last dimension must have stride 1
    q2 = q if q.stride(-1) == 1 else q.contiguous()
    kv2 = kv[:, 0, :]
    kv2 = kv2 if kv2.stride(-1) == 1 else kv2.contiguous()
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    kernels = kernels_for(heads=h_q, qk_dim=d_qk, v_dim=d_v, topk=topk, backend=backend)
    max_logits = torch.empty((s_q, h_q), dtype=torch.float32, device=q.device)
    out, lse = kernels.run("sparse_attention", q2, kv2, idx, sm_scale, max_logits=max_logits)
    return out, max_logits, lse
