"""FlashMLA's sparse entry points, run by dsagen's kernels for any head count (FlashMLA takes 64 or
128) and any top-k: the FP8 decode (`get_mla_metadata`, `flash_mla_with_kvcache` with `indices`) and
the bf16 prefill (`flash_mla_sparse_fwd`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..backends import BACKENDS
from ..cache_formats import MLA_FORMATS
from ._args import Args
from ._builds import kernels_for_call

BF16 = torch.bfloat16
FP8_CACHE = MLA_FORMATS["deepseek_v32_fp8"]  # 512 fp8 latent | 4 fp32 scales | 64 bf16 rope per token


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
    out of range = invalid. A query with no valid index gives out 0 and lse +inf (every query, where
    topk is 0). Only the sparse FP8 path is served (indices given, is_fp8_kvcache=True,
    causal=False), as in FlashMLA; block_table and cache_seqlens are not read on it.
    """
    args = Args("flash_mla_with_kvcache")
    causal, is_fp8_kvcache = args.flag("causal", causal), args.flag("is_fp8_kvcache", is_fp8_kvcache)
    if indices is None or not is_fp8_kvcache or causal:
        raise args.fail("dsagen serves the sparse FP8 path only: pass indices, "
                        "is_fp8_kvcache=True and causal=False")
    if args.integer("head_dim_v", head_dim_v, 1) != FP8_CACHE.latent_dim:
        raise args.fail(f"head_dim_v={head_dim_v!r}: must be {FP8_CACHE.latent_dim} (the V3.2 FP8 cache)")
    if not isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        raise args.fail("tile_scheduler_metadata must come from dsagen.compat.flash_mla.get_mla_metadata(), "
                        f"got {type(tile_scheduler_metadata).__name__}", TypeError)
    if num_splits is not None:
        raise args.fail(f"num_splits must be None (what get_mla_metadata() returns), got {type(num_splits).__name__}")
    unread = "not read on the sparse path: indices hold the cache slots"
    args.optional_tensor("block_table", block_table, unread)
    args.optional_tensor("cache_seqlens", cache_seqlens, unread)
    d_qk = FP8_CACHE.latent_dim + FP8_CACHE.rope_dim
    args.tensor("q", q, BF16, f"[b, s_q, h_q, {d_qk}] bf16", (None, None, None, None))
    (b, s_q, h_q, q_dim), dev = q.shape, q.device
    if q_dim != d_qk:
        raise args.fail(f"q.shape[-1] (d_qk) must be {d_qk} ({FP8_CACHE.latent_dim} latent + {FP8_CACHE.rope_dim} "
                        f"rope values per token: the FP8 cache's layout), got {q_dim}")
    if isinstance(k_cache, torch.Tensor) and k_cache.dtype == torch.float8_e4m3fn:
        k_cache = k_cache.view(torch.uint8)
    row_bytes = FP8_CACHE.bytes_per_token
    args.tensor("k_cache", k_cache, torch.uint8, f"[blocks, page_size, 1, {row_bytes}] uint8 or fp8_e4m3fn",
                (None, None, 1, row_bytes), dev)
    offset = 0 if torch.compiler.is_compiling() else k_cache.storage_offset()
    if any(x % 4 for x in (k_cache.stride(0), k_cache.stride(1), offset)):
        raise args.fail(f"k_cache rows must start at multiples of 4 bytes (strides {k_cache.stride()}, offset "
                        f"{offset}), so its fp32 scales can be read in place")
    args.tensor("indices", indices, torch.int32, "[b, s_q, topk] int32, b, s_q = q.shape[:2]", (b, s_q, None), dev)
    scale = args.scale("softmax_scale", softmax_scale)
    args.at_least_one("h_q (q.shape[2])", h_q)
    args.no_grad_needed({"q": q})
    shapes = {"b": b, "s_q": s_q, "h_q": h_q, "page": k_cache.shape[1], "topk": indices.shape[-1]}
    if tile_scheduler_metadata.config and tile_scheduler_metadata.config != shapes:
        raise args.fail(f"tile_scheduler_metadata was made for {tile_scheduler_metadata.config}, "
                        f"this call has {shapes}: use one metadata object per shape")
    tile_scheduler_metadata.config = shapes
    if indices.shape[-1] == 0:  # no index can be valid
        return (torch.zeros((b, s_q, h_q, FP8_CACHE.latent_dim), dtype=BF16, device=dev),
                torch.full((b, h_q, s_q), math.inf, device=dev))
    said = {"heads": "h_q (q.shape[2])", "topk": "topk (indices.shape[-1])",
            "page_size": "page_size (k_cache.shape[1])"}
    kernels = kernels_for_call(args.fn, said, heads=h_q, qk_dim=d_qk, v_dim=FP8_CACHE.latent_dim,
                               topk=indices.shape[-1], page_size=k_cache.shape[1])
    out, lse = kernels.sparse_decode(q, k_cache, indices, q_dim ** -0.5 if scale is None else scale)
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
    any topk are accepted (FlashMLA takes h_q 64 or 128). There is no backward (as in FlashMLA):
    inputs that require grad are refused outside torch.no_grad(). backend (dsagen's, keyword
    only): the kernels to run, "triton" or "tvm".
    """
    args = Args("flash_mla_sparse_fwd")
    if attn_sink is not None:
        raise args.fail("attn_sink is not supported by dsagen's flash_mla_sparse_fwd: pass attn_sink=None "
                        "(supported: q, kv, indices, sm_scale, d_v=512 and topk_length)")
    d_v = args.integer("d_v", d_v, 1)
    if d_v != 512:
        raise args.fail(f"d_v={d_v}: must be 512 (V is the first 512 columns of each kv row)")
    sm_scale = args.scale("sm_scale", sm_scale)
    if backend not in BACKENDS:
        raise args.fail(f"backend={backend!r} is not supported: allowed {', '.join(BACKENDS)}")
    copied = dict(contiguous_last=False)  # the kernels take row strides: a strided last dimension is copied
    args.tensor("q", q, BF16, "[s_q, h_q, d_qk] bf16", (None, None, None), **copied)
    (s_q, h_q, d_qk), dev = q.shape, q.device
    if d_qk not in (576, 512):
        raise args.fail(f"q.shape[-1] (d_qk) must be 576 (512 latent + 64 rope) or 512 (latent only), got {d_qk}")
    args.tensor("kv", kv, BF16, "[s_kv, h_kv=1, d_qk] bf16, d_qk = q.shape[-1]: sparse MLA shares one kv head",
                (None, 1, d_qk), dev, **copied)
    args.tensor("indices", indices, torch.int32, "[s_q, h_kv=1, topk] int32, s_q = q.shape[0]", (s_q, 1, None), dev,
                **copied)
    if topk_length is not None:
        args.tensor("topk_length", topk_length, torch.int32, "[s_q] int32 or None, s_q = q.shape[0]", (s_q,), dev,
                    **copied)
    args.at_least_one("h_q (q.shape[1])", h_q)
    args.no_grad_needed({"q": q, "kv": kv})
    topk = indices.shape[2]
    idx = indices[:, 0, :]
    if topk_length is not None:
        keep = torch.arange(topk, device=idx.device, dtype=torch.int32)[None, :] < topk_length[:, None]
        idx = torch.where(keep, idx, -1)
    if topk == 0 or kv.shape[0] == 0:  # no index can be valid
        out = torch.zeros((s_q, h_q, d_v), dtype=q.dtype, device=q.device)
        return (out, torch.full((s_q, h_q), -math.inf, device=q.device),
                torch.full((s_q, h_q), math.inf, device=q.device))
    q2 = q if q.stride(-1) == 1 else q.contiguous()
    kv2 = kv[:, 0, :]
    kv2 = kv2 if kv2.stride(-1) == 1 else kv2.contiguous()
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    said = {"heads": "h_q (q.shape[1])", "topk": "topk (indices.shape[-1])", "qk_dim": "d_qk (q.shape[-1])",
            "v_dim": "d_v"}
    kernels = kernels_for_call(args.fn, said, heads=h_q, qk_dim=d_qk, v_dim=d_v, topk=topk, backend=backend)
    max_logits = torch.empty((s_q, h_q), dtype=torch.float32, device=q.device)
    out, lse = kernels.run("sparse_attention", q2, kv2, idx, sm_scale, max_logits=max_logits)
    return out, max_logits, lse
