"""FlashMLA's sparse entry points (its interface of 2026-04), run by dsagen's kernels for any head
count (FlashMLA takes 64 or 128), any top-k and any page size: the FP8 decode (`get_mla_metadata`,
`flash_mla_with_kvcache` with `indices`) over DeepSeek-V3.2's cache or DeepSeek-V4's MODEL1 cache,
with attention sinks, a second (window) cache and per-request top-k lengths, and the bf16 prefill
(`flash_mla_sparse_fwd`, with sinks and per-query top-k lengths)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..backends import BACKENDS
from ..cache_formats import MLA_FORMATS, MLABlockFormat, check_page_size
from ._args import Args
from ..distributed.attention import no_mass
from ._builds import kernels_for_call

BF16 = torch.bfloat16
FP8_CACHE = MLA_FORMATS["deepseek_v32_fp8"]  # 512 fp8 latent | 4 fp32 scales | 64 bf16 rope per token
MODEL1_CACHE = MLA_FORMATS["deepseek_v4_fp8"]  # per block: [448 fp8 | 64 bf16] rows, then [7 ue8m0 | pad] rows
HEAD_DIM_V = 512  # both caches: V is 512 wide (V3.2: the latent; MODEL1: the whole row)
CACHE_NAMES = {FP8_CACHE.name: "DeepSeek-V3.2's FP8 cache", MODEL1_CACHE.name: "DeepSeek-V4's MODEL1 cache"}
MAX_SLOTS = 2**31 - 2  # int32 slots


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


@dataclass
class FlashMLASchedMeta:
    """What `get_mla_metadata` returns and `flash_mla_with_kvcache` takes back. dsagen's kernels
    schedule themselves; as FlashMLA's, the first call records its shapes in `config` and a later
    call with other shapes is an error (tile_scheduler_metadata and num_splits stay None)."""

    @dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: int | None
        extra_page_block_size: int | None
        extra_topk: int | None

    have_initialized: bool = False
    config: Config | None = None
    tile_scheduler_metadata: torch.Tensor | None = None
    num_splits: torch.Tensor | None = None


def get_mla_metadata(*args, **kwargs) -> tuple[FlashMLASchedMeta, None]:
    """(a fresh FlashMLASchedMeta, None); the arguments of older FlashMLA versions are accepted."""
    return FlashMLASchedMeta(), None


def _record_shapes(args: Args, meta: FlashMLASchedMeta, config: FlashMLASchedMeta.Config) -> None:
    """The first call's shapes go into meta; a later call must have the same."""
    if not meta.have_initialized:
        meta.have_initialized, meta.config = True, config
        return
    if meta.config != config:
        made, now = dataclasses.asdict(meta.config), dataclasses.asdict(config)
        differ = [name for name in made if made[name] != now[name]]
        raise args.fail("tile_scheduler_metadata was made for " + ", ".join(f"{n}={made[n]}" for n in differ)
                        + "; this call has " + ", ".join(f"{n}={now[n]}" for n in differ)
                        + ": use one metadata object per shape")


def _cache_format(k_cache):
    """The cache format k_cache's row width names: 584 bytes MODEL1, anything else V3.2's (656)."""
    rows_of_584 = isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 and k_cache.dtype in (
        torch.uint8, torch.float8_e4m3fn) and k_cache.shape[-1] == MODEL1_CACHE.bytes_per_token
    return MODEL1_CACHE if rows_of_584 else FP8_CACHE


def _check_cache(args: Args, name: str, cache, fmt, device) -> torch.Tensor:
    """cache as a uint8 [blocks, page_size, 1, bytes_per_token] tensor of format fmt, any page size
    >= 1: V3.2 rows start 4-byte aligned (its fp32 scales are read in place); a MODEL1 cache
    holds each block's page_size x 584 bytes packed (FlashMLA's layout, any block stride)."""
    if isinstance(cache, torch.Tensor) and cache.dtype == torch.float8_e4m3fn:
        cache = cache.view(torch.uint8)
    row = fmt.bytes_per_token
    args.tensor(name, cache, torch.uint8, f"[blocks, page_size, 1, {row}] uint8 or fp8_e4m3fn, "
                f"{CACHE_NAMES[fmt.name]}", (None, None, 1, row), device)
    n_blocks, page = cache.shape[:2]
    args.at_least_one(f"page_size ({name}.shape[1])", page)
    if n_blocks * page > MAX_SLOTS:
        raise args.fail(f"{name} has {n_blocks * page} slots: int32 indices address at most {MAX_SLOTS}")
    if isinstance(fmt, MLABlockFormat):
        if (page > 1 and cache.stride(1) != row) or (n_blocks > 1 and cache.stride(0) < page * row):
            raise args.fail(f"{name} must hold each block's {page} x {row} bytes packed (strides [>= {page * row}, "
                            f"{row}, *, 1], the MODEL1 layout), got strides {list(cache.stride())}")
        return cache
    offset = 0 if torch.compiler.is_compiling() else cache.storage_offset()
    if any(x % 4 for x in (cache.stride(0), cache.stride(1), offset)):
        raise args.fail(f"{name} rows must start at multiples of 4 bytes (strides {cache.stride()}, offset "
                        f"{offset}), so its fp32 scales can be read in place")
    return cache


def _check_lengths(args: Args, name: str, lengths, b: int, device) -> None:
    if lengths is not None:
        args.tensor(name, lengths, torch.int32, "[b] int32 or None, b = q.shape[0]", (b,), device,
                    contiguous_last=False)


def _check_sink(args: Args, attn_sink, h_q: int, device) -> None:
    if attn_sink is not None:
        args.tensor("attn_sink", attn_sink, torch.float32, "[h_q] fp32 or None, h_q the query heads", (h_q,),
                    device, contiguous_last=False)


def _build_page_size(page: int) -> int:
    """The page size of the build's spec: the cache's where the spec takes it (1 to 2**20), else the
    default. The decode kernel reads the page size from the cache tensor either way."""
    return page if check_page_size(page) is None else 64


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table, cache_seqlens, head_dim_v: int,
                           tile_scheduler_metadata: FlashMLASchedMeta, num_splits=None,
                           softmax_scale: float | None = None, causal: bool = False, is_fp8_kvcache: bool = False,
                           indices: torch.Tensor | None = None, attn_sink: torch.Tensor | None = None,
                           extra_k_cache: torch.Tensor | None = None,
                           extra_indices_in_kvcache: torch.Tensor | None = None,
                           topk_length: torch.Tensor | None = None,
                           extra_topk_length: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse FP8 decode: (out [b, s_q, h_q, 512] bf16, lse [b, h_q, s_q] fp32, natural log).

    Two cache formats, told apart by k_cache's row width (uint8 or fp8, [blocks, page_size, 1, *],
    any page_size >= 1):
    - 656 B (DeepSeek-V3.2: 512 fp8 | 4 fp32 scales | 64 bf16 rope per token): q [b, s_q, h_q,
      576] bf16, V = the 512 latent values. Runs the sparse decode kernel on the cache in place.
    - 584 B (DeepSeek-V4's MODEL1: per block, page_size rows [448 fp8 | 64 bf16], then page_size
      rows [7 ue8m0 scales | pad], blocks padded to 576 B): q [b, s_q, h_q, 512] bf16, V = the
      whole 512-value row. Runs the sparse decode kernel on the cache in place.
    indices [b, s_q, topk] int32 cache slots (block * page_size + offset), -1 or out of range =
    invalid; topk_length [b] int32: only request i's first topk_length[i] slots count.
    extra_k_cache (the same format, its own page size) with extra_indices_in_kvcache [b, s_q,
    extra_topk] and extra_topk_length [b]: a second selection attended in the same softmax.
    One kernel launch reads both caches, cuts the lengths and applies the sink, with no host sync.
    attn_sink [h_q] fp32: out *= 1 / (1 + exp(attn_sink[h] - lse)) (lse unchanged; -inf: no
    effect, +inf: out 0). A query with no valid slot in either selection gives out 0 and lse +inf.
    Only the sparse FP8 path is served (indices given, is_fp8_kvcache=True, causal=False), as in
    FlashMLA; block_table and cache_seqlens are not read on it.
    """
    args = Args("flash_mla_with_kvcache")
    causal, is_fp8_kvcache = args.flag("causal", causal), args.flag("is_fp8_kvcache", is_fp8_kvcache)
    if indices is None or not is_fp8_kvcache or causal:
        raise args.fail("dsagen serves the sparse FP8 path only: pass indices, "
                        "is_fp8_kvcache=True and causal=False")
    if args.integer("head_dim_v", head_dim_v, 1) != HEAD_DIM_V:
        raise args.fail(f"head_dim_v={head_dim_v!r}: must be {HEAD_DIM_V} (both FP8 caches' V is 512 wide)")
    if not isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        raise args.fail("tile_scheduler_metadata must come from dsagen.compat.flash_mla.get_mla_metadata(), "
                        f"got {type(tile_scheduler_metadata).__name__}", TypeError)
    if num_splits is not None:
        raise args.fail(f"num_splits must be None (what get_mla_metadata() returns), got {type(num_splits).__name__}")
    unread = "not read on the sparse path: indices hold the cache slots"
    args.optional_tensor("block_table", block_table, unread)
    args.optional_tensor("cache_seqlens", cache_seqlens, unread)
    fmt = _cache_format(k_cache)
    d_qk = fmt.qk_dim
    args.tensor("q", q, BF16, f"[b, s_q, h_q, {d_qk}] bf16", (None, None, None, None))
    (b, s_q, h_q, q_dim), dev = q.shape, q.device
    if q_dim != d_qk:
        raise args.fail(f"q.shape[-1] (d_qk) must be {d_qk} with {CACHE_NAMES[fmt.name]} (k_cache rows of "
                        f"{fmt.bytes_per_token} bytes), got {q_dim}; 576 goes with 656-byte rows, 512 with 584")
    k_cache = _check_cache(args, "k_cache", k_cache, fmt, dev)
    args.tensor("indices", indices, torch.int32, "[b, s_q, topk] int32, b, s_q = q.shape[:2]", (b, s_q, None), dev)
    if (extra_k_cache is None) != (extra_indices_in_kvcache is None):
        raise args.fail("extra_k_cache and extra_indices_in_kvcache go together: pass both (the second cache "
                        "and its slots) or neither")
    if extra_k_cache is not None:
        extra_k_cache = _check_cache(args, "extra_k_cache", extra_k_cache, fmt, dev)
        args.tensor("extra_indices_in_kvcache", extra_indices_in_kvcache, torch.int32,
                    "[b, s_q, extra_topk] int32, b, s_q = q.shape[:2]", (b, s_q, None), dev)
    elif extra_topk_length is not None:
        raise args.fail("extra_topk_length needs extra_k_cache and extra_indices_in_kvcache (it cuts their slots)")
    _check_lengths(args, "topk_length", topk_length, b, dev)
    _check_lengths(args, "extra_topk_length", extra_topk_length, b, dev)
    _check_sink(args, attn_sink, h_q, dev)
    scale = args.scale("softmax_scale", softmax_scale)
    scale = q_dim ** -0.5 if scale is None else scale
    args.at_least_one("h_q (q.shape[2])", h_q)
    args.no_grad_needed({"q": q})
    main, extra = Selection(k_cache, indices), None
    if extra_k_cache is not None:
        extra = Selection(extra_k_cache, extra_indices_in_kvcache)
    _record_shapes(args, tile_scheduler_metadata, FlashMLASchedMeta.Config(
        b, s_q, h_q, k_cache.shape[1], 1, causal, is_fp8_kvcache, indices.shape[-1],
        extra.cache.shape[1] if extra else None, extra.width if extra else None))
    if extra is not None and extra.is_empty():
        extra, extra_topk_length = None, None
    if main.is_empty():
        if extra is None:  # no slot can be valid
            out, lse = no_mass(q, HEAD_DIM_V)
            return out, lse.transpose(1, 2).contiguous()
        main, topk_length = Selection(k_cache, indices.new_full((b, s_q, 1), -1)), None
    kernels = _decode_build(args, fmt, h_q, main)
    out, lse = kernels.sparse_decode(
        q, main.cache, _unit_last(main.slots), scale, _unit_last(attn_sink), _unit_last(topk_length),
        extra.cache if extra else None, _unit_last(extra.slots) if extra else None, _unit_last(extra_topk_length))
    return out, lse.transpose(1, 2).contiguous()


def _unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    """t with a unit stride in its last dimension (a copy only where it has none), or None."""
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _decode_build(args: Args, fmt, h_q: int, main: Selection):
    """The sparse decode build of the cache format, the heads and the main selection's width (the
    window selection's width is a run-time size of the kernel)."""
    d_qk, v_dim = fmt.qk_dim, fmt.v_dim
    said = {"heads": "h_q (q.shape[2])", "topk": "topk (indices.shape[-1])"}
    return kernels_for_call(args.fn, said, heads=h_q, qk_dim=d_qk, v_dim=v_dim, topk=main.width,
                            page_size=_build_page_size(main.cache.shape[1]), mla_format=fmt.name)


def flash_mla_sparse_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512,
                         attn_sink: torch.Tensor | None = None, topk_length: torch.Tensor | None = None, *,
                         backend: str = "triton") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse prefill attention: (out [s_q, h_q, d_v] bf16, max_logits [s_q, h_q] fp32, lse [s_q, h_q] fp32).

    q [s_q, h_q, d_qk] bf16 (d_qk 576, or 512: no rope part); kv [s_kv, 1, d_qk] bf16; indices
    [s_q, 1, topk] int32 rows of kv, where a value < 0 or >= s_kv is invalid. Over each query's
    valid indices: out = softmax(sm_scale * q . kv) @ kv[:, :d_v], lse its natural-log
    logsumexp and max_logits the largest sm_scale * q . kv. A query with no valid index gives
    out 0, max_logits -inf and lse +inf. topk_length [s_q] int32 (optional): only the first
    topk_length[i] indices of query i count. attn_sink [h_q] fp32 (optional): out *= 1 / (1 +
    exp(attn_sink[h] - lse)) in fp32 (-inf: no effect, +inf: out 0; lse and max_logits
    unchanged). Any h_q and any topk are accepted (FlashMLA takes h_q 64 or 128). There is no
    backward (as in FlashMLA): inputs that require grad are refused outside torch.no_grad().
    backend (dsagen's, keyword only): the kernels to run, "triton" or "tvm".
    """
    args = Args("flash_mla_sparse_fwd")
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
    _check_sink(args, attn_sink, h_q, dev)
    args.at_least_one("h_q (q.shape[1])", h_q)
    args.no_grad_needed({"q": q, "kv": kv})
    topk = indices.shape[2]
    if topk == 0 or kv.shape[0] == 0:  # no index can be valid
        out = torch.zeros((s_q, h_q, d_v), dtype=q.dtype, device=q.device)
        return (out, torch.full((s_q, h_q), -math.inf, dtype=torch.float32, device=q.device),
                torch.full((s_q, h_q), math.inf, dtype=torch.float32, device=q.device))
    q2 = q if q.stride(-1) == 1 else q.contiguous()
    kv2 = kv[:, 0, :]
    kv2 = kv2 if kv2.stride(-1) == 1 else kv2.contiguous()
    idx = indices[:, 0, :]
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    lengths = topk_length if topk_length is None or topk_length.stride(-1) == 1 else topk_length.contiguous()
    said = {"heads": "h_q (q.shape[1])", "topk": "topk (indices.shape[-1])", "qk_dim": "d_qk (q.shape[-1])",
            "v_dim": "d_v"}
    kernels = kernels_for_call(args.fn, said, heads=h_q, qk_dim=d_qk, v_dim=d_v, topk=topk, backend=backend)
    max_logits = torch.empty((s_q, h_q), dtype=torch.float32, device=q.device)
    # the kernel masks each query's slots past its length and applies the sink (lse unchanged)
    out, lse = kernels.sparse_attention(q2, kv2, idx, sm_scale, attn_sink, lengths, max_logits=max_logits)
    return out, max_logits, lse
