"""Paged KV-cache formats of the decode path, as data: a new format is a new table entry.

Two caches, both paged (a page holds `page_size` consecutive tokens of one request; a request's
block table lists its pages):

- the MLA cache of sparse attention (MLA_FORMATS), either
  - one row of `bytes_per_token` bytes per token (MLACacheFormat): `latent_dim` fp8 e4m3 values |
    one fp32 scale per `group` latent values | `rope_dim` bf16 values. DeepSeek-V3.2 (FlashMLA's
    FP8 sparse decode): 512 | 4 x fp32 | 64 x bf16 = 656 B/token. The scales are powers of two,
    2^ceil(log2(amax / 448)) with amax clamped at 1e-4, so a latent value is `fp8 * scale` exactly;
  - or per page block (MLABlockFormat): the page's data rows [`latent_dim` fp8 | `rope_dim` bf16],
    then its scale rows [one ue8m0 scale per `group` latent values | padding], the block padded to
    a multiple of `block_align` bytes. DeepSeek-V4 (FlashMLA's MODEL1): page x 576 B of [448 fp8 |
    64 bf16], then page x 8 B of [7 ue8m0 | 1 pad] = 584 B/token, blocks padded to 576 B multiples;
    any page size. A ue8m0 scale is a power of two stored as its biased exponent byte,
    2^ceil(log2(max(amax / 448, 1e-4))). Callers see a [blocks, page, 1, 584] uint8 view whose
    block stride is the padded size (its token rows are not the tokens' bytes: the codecs read the
    block's two regions).
- the indexer key cache (DeepGEMM's paged layout): per page, the page's `page_size x head_dim` fp8
  keys first, then their `page_size` fp32 scales; `head_dim + 4` bytes per token.

The float64 codecs here (quantize on the host, dequantize for references) are what the kernels'
outputs are checked against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8_MAX = 448.0  # the largest finite e4m3fn value
AMAX_FLOOR = 1e-4


@dataclass(frozen=True)
class MLACacheFormat:
    """One token's row of the MLA cache: fp8 latent values | fp32 scales | bf16 rope values."""

    name: str
    latent_dim: int  # fp8 values (V = these, dequantized)
    rope_dim: int  # bf16 values
    group: int  # latent values sharing one scale

    @property
    def n_scales(self) -> int:
        return self.latent_dim // self.group

    @property
    def qk_dim(self) -> int:
        return self.latent_dim + self.rope_dim

    @property
    def v_dim(self) -> int:
        """V (and the attention's out) is the latent part; the rope part enters the scores only."""
        return self.latent_dim

    @property
    def bytes_per_token(self) -> int:
        return self.latent_dim + 4 * self.n_scales + 2 * self.rope_dim

    @property
    def scale_offset(self) -> int:
        return self.latent_dim

    @property
    def rope_offset(self) -> int:
        return self.latent_dim + 4 * self.n_scales


@dataclass(frozen=True)
class IndexCacheFormat:
    """The indexer key cache: per page, page_size x head_dim fp8 keys, then page_size fp32 scales."""

    name: str

    @staticmethod
    def bytes_per_token(head_dim: int) -> int:
        return head_dim + 4


UE8M0_BIAS = 127  # a ue8m0 byte e is the scale 2^(e - 127)
UE8M0_NAN = 0xFF  # ue8m0's only non-finite code


@dataclass(frozen=True)
class MLABlockFormat:
    """A page block of the MLA cache: page_size data rows [latent fp8 | rope bf16], then page_size
    scale rows [n_scales ue8m0 bytes | padding to scale_row_bytes], padded to a block_align multiple."""

    name: str
    latent_dim: int  # fp8 values (V4 calls them NoPE)
    rope_dim: int  # bf16 values
    group: int  # latent values sharing one scale
    scale_row_bytes: int  # a token's scale bytes and padding
    block_align: int  # a block's size is a multiple of this
    scale_floor: float  # amax / 448 is raised to this before its power of two is taken

    @property
    def n_scales(self) -> int:
        return self.latent_dim // self.group

    @property
    def qk_dim(self) -> int:
        return self.latent_dim + self.rope_dim

    @property
    def v_dim(self) -> int:
        """V (and the attention's out) is the whole dequantized row, rope part included."""
        return self.qk_dim

    @property
    def data_row_bytes(self) -> int:
        return self.latent_dim + 2 * self.rope_dim

    @property
    def bytes_per_token(self) -> int:
        return self.data_row_bytes + self.scale_row_bytes


MLA_FORMATS = {
    "deepseek_v32_fp8": MLACacheFormat("deepseek_v32_fp8", latent_dim=512, rope_dim=64, group=128),
    "deepseek_v4_fp8": MLABlockFormat("deepseek_v4_fp8", latent_dim=448, rope_dim=64, group=64, scale_row_bytes=8,
                                      block_align=576, scale_floor=1e-4),
}
INDEX_FORMATS = {
    "deepgemm_fp8": IndexCacheFormat("deepgemm_fp8"),
}


def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(max(amax, 1e-4) / 448)) in float64: the power-of-two scale of a group."""
    return torch.exp2(torch.ceil(torch.log2(amax.double().clamp_min(AMAX_FLOOR) / FP8_MAX)))


def quantize_mla_rows(rows: torch.Tensor, fmt: MLACacheFormat) -> torch.Tensor:
    """bf16/fp32 rows [n, latent + rope] -> uint8 cache rows [n, bytes_per_token] (host reference)."""
    n = rows.shape[0]
    latent = rows[:, :fmt.latent_dim].double().reshape(n, fmt.n_scales, fmt.group)
    scale = pow2_scale(latent.abs().amax(-1))  # [n, n_scales]
    codes = (latent / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(n, fmt.latent_dim)
    out = torch.empty(n, fmt.bytes_per_token, dtype=torch.uint8, device=rows.device)
    out[:, :fmt.latent_dim] = codes.view(torch.uint8)
    out[:, fmt.scale_offset:fmt.rope_offset] = scale.float().contiguous().view(torch.uint8).reshape(n, -1)
    rope = rows[:, fmt.latent_dim:fmt.latent_dim + fmt.rope_dim].to(torch.bfloat16).contiguous()
    out[:, fmt.rope_offset:] = rope.view(torch.uint8).reshape(n, -1)
    return out


def dequantize_mla_rows(cache_rows: torch.Tensor, fmt: MLACacheFormat) -> torch.Tensor:
    """uint8 cache rows [n, bytes_per_token] -> float64 [n, latent + rope] (what the kernels read)."""
    n = cache_rows.shape[0]
    rows = cache_rows.reshape(n, fmt.bytes_per_token)
    codes = rows[:, :fmt.latent_dim].contiguous().view(torch.float8_e4m3fn).double()
    scale = rows[:, fmt.scale_offset:fmt.rope_offset].contiguous().view(torch.float32).double()
    latent = (codes.reshape(n, fmt.n_scales, fmt.group) * scale[..., None]).reshape(n, fmt.latent_dim)
    rope = rows[:, fmt.rope_offset:].contiguous().view(torch.bfloat16).double()
    return torch.cat([latent, rope], dim=1)


def pack_index_pages(keys_fp8: torch.Tensor, scales: torch.Tensor, page_size: int) -> torch.Tensor:
    """fp8 keys [n_pages * page_size, D] and fp32 scales [n_pages * page_size] -> the uint8 cache
    [n_pages, page_size, 1, D + 4] laid out per page as keys then scales (host reference)."""
    n_tokens, head_dim = keys_fp8.shape
    if n_tokens % page_size:
        raise ValueError(f"{n_tokens} tokens do not fill whole pages of {page_size}")
    n_pages = n_tokens // page_size
    page = torch.empty(n_pages, page_size * (head_dim + 4), dtype=torch.uint8, device=keys_fp8.device)
    page[:, :page_size * head_dim] = keys_fp8.contiguous().view(torch.uint8).reshape(n_pages, -1)
    page[:, page_size * head_dim:] = scales.float().contiguous().view(torch.uint8).reshape(n_pages, -1)
    return page.reshape(n_pages, page_size, 1, head_dim + 4)


def unpack_index_pages(cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_index_pages: (keys as float64 [n_pages * page_size, D], scales float64)."""
    n_pages, page_size = cache.shape[0], cache.shape[1]
    flat = cache.reshape(n_pages, page_size * (head_dim + 4))
    keys = flat[:, :page_size * head_dim].contiguous().view(torch.float8_e4m3fn).double().reshape(-1, head_dim)
    scales = flat[:, page_size * head_dim:].contiguous().view(torch.float32).double().reshape(-1)
    return keys, scales


MAX_PAGE_SIZE = 1 << 20  # x 656 B (the widest token row) stays below 2**31: kernels offset within a page in int32


def check_page_size(page_size: int) -> str | None:
    """What is wrong with a page size, or None: any int from 1 to MAX_PAGE_SIZE (a key block of a
    kernel may straddle pages; the bound keeps a page's byte offsets inside int32)."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1 or page_size > MAX_PAGE_SIZE:
        return (f"must be an int from 1 to {MAX_PAGE_SIZE} (the kernels address a page's bytes with int32 "
                "offsets)")
    return None


# -- the MLA cache by page blocks, for either kind of format ---------------------------------------

def check_mla_page_size(fmt: MLACacheFormat | MLABlockFormat, page_size: int) -> str | None:
    """What is wrong with a page size of this format's cache, or None: the row formats take what the
    kernels tile (check_page_size); a block format holds any number of tokens per block."""
    if isinstance(fmt, MLACacheFormat):
        return check_page_size(page_size)
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        return "must be an int >= 1"
    return None


def mla_block_bytes(fmt: MLACacheFormat | MLABlockFormat, page_size: int) -> int:
    """The bytes from one page block to the next (a block format pads each block)."""
    used = page_size * fmt.bytes_per_token
    if isinstance(fmt, MLACacheFormat):
        return used
    return -(-used // fmt.block_align) * fmt.block_align


def _checked_page_size(fmt, page_size: int) -> int:
    if (problem := check_mla_page_size(fmt, page_size)) is not None:
        raise ValueError(f"page_size={page_size!r} {problem} (the {fmt.name} cache)")
    return page_size


def allocate_mla_cache(fmt: MLACacheFormat | MLABlockFormat, n_blocks: int, page_size: int,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """A zeroed cache of n_blocks blocks: the uint8 [n_blocks, page_size, 1, bytes_per_token] view
    callers hand the kernels, its block stride mla_block_bytes (the padded size)."""
    _checked_page_size(fmt, page_size)
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 0:
        raise ValueError(f"n_blocks={n_blocks!r} must be an int >= 0")
    storage = torch.zeros(n_blocks, mla_block_bytes(fmt, page_size), dtype=torch.uint8, device=device)
    return storage[:, :page_size * fmt.bytes_per_token].view(n_blocks, page_size, 1, fmt.bytes_per_token)


def block_regions(cache: torch.Tensor, fmt: MLABlockFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a block-format cache's two regions: data rows [n_blocks, page, data_row_bytes] and
    scale rows [n_blocks, page, scale_row_bytes]."""
    n_blocks, page, bpt = cache.shape[0], cache.shape[1], fmt.bytes_per_token
    if cache.dtype != torch.uint8 or cache.dim() != 4 or cache.shape[2:] != (1, bpt):
        raise ValueError(f"cache must be a uint8 [n_blocks, page_size, 1, {bpt}] tensor ({fmt.name}), "
                         f"got {cache.dtype} {list(cache.shape)}")
    if n_blocks and (cache.stride(3) != 1 or (page > 1 and cache.stride(1) != bpt)
                     or (n_blocks > 1 and cache.stride(0) < page * bpt)):
        raise ValueError(f"cache must hold each block's {page} x {bpt} bytes packed (strides [>= {page * bpt}, "
                         f"{bpt}, *, 1]), got strides {list(cache.stride())}")
    flat = cache.as_strided((n_blocks, page * bpt), (cache.stride(0), 1))
    data = flat[:, :page * fmt.data_row_bytes].view(n_blocks, page, fmt.data_row_bytes)
    scales = flat[:, page * fmt.data_row_bytes:].view(n_blocks, page, fmt.scale_row_bytes)
    return data, scales


def ue8m0_exponents(amax: torch.Tensor, floor: float) -> torch.Tensor:
    """The ue8m0 bytes of the scales 2^ceil(log2(max(amax / 448, floor))), computed in float64 (int64);
    a NaN or infinite amax gets UE8M0_NAN (ue8m0 has no infinity)."""
    exponent = torch.ceil(torch.log2((amax.double() / FP8_MAX).clamp_min(floor)))
    finite = torch.isfinite(exponent)
    return torch.where(finite, exponent.nan_to_num(0).long() + UE8M0_BIAS, UE8M0_NAN)


def ue8m0_values(codes: torch.Tensor) -> torch.Tensor:
    """ue8m0 bytes as float64 scales: 2^(e - 127), and NaN for UE8M0_NAN."""
    e = codes.long()
    return torch.where(e == UE8M0_NAN, math.nan, torch.exp2((e - UE8M0_BIAS).double()))


def quantize_block_rows(rows: torch.Tensor, fmt: MLABlockFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 rows [n, latent + rope] -> (data rows [n, data_row_bytes], scale rows [n, scale_row_bytes])
    uint8. A group holding NaN or +-inf gets the NaN scale byte and NaN codes (it dequantizes to
    NaN, as the V3.2 codec's do). Codes round to the nearest e4m3 value, up as well: bf16's largest,
    255 x 2^120, comes back as 256 x 2^120 = 2^128, past fp32's range."""
    n = rows.shape[0]
    latent = rows[:, :fmt.latent_dim].double().reshape(n, fmt.n_scales, fmt.group)
    exponents = ue8m0_exponents(latent.abs().amax(-1), fmt.scale_floor)  # [n, n_scales]
    codes = (latent / ue8m0_values(exponents)[..., None]).to(torch.float8_e4m3fn).reshape(n, fmt.latent_dim)
    rope = rows[:, fmt.latent_dim:].contiguous().view(torch.uint8)
    data = torch.cat([codes.view(torch.uint8), rope], dim=1)
    scales = torch.zeros(n, fmt.scale_row_bytes, dtype=torch.uint8, device=rows.device)
    scales[:, :fmt.n_scales] = exponents.to(torch.uint8)
    return data, scales


def _check_rows(rows: torch.Tensor, fmt, page_size: int) -> int:
    """The number of blocks the rows fill (ValueError unless they fill whole blocks)."""
    width = fmt.qk_dim
    if rows.dim() != 2 or rows.shape[1] != width:
        raise ValueError(f"rows must be [n_blocks * page_size, {width}] ({fmt.name}), got {list(rows.shape)}")
    if isinstance(fmt, MLABlockFormat) and rows.dtype != torch.bfloat16:
        raise ValueError(f"rows must be bf16 (the {fmt.name} cache stores bf16 rope values), got {rows.dtype}")
    if rows.shape[0] % page_size:
        raise ValueError(f"{rows.shape[0]} rows do not fill whole blocks of page_size={page_size}")
    return rows.shape[0] // page_size


def quantize_mla_pages(rows: torch.Tensor, fmt: MLACacheFormat | MLABlockFormat, page_size: int) -> torch.Tensor:
    """Rows [n_blocks * page_size, latent + rope] (block b holds rows b * page_size ...) -> a cache
    from allocate_mla_cache holding them, quantized (host reference)."""
    n_blocks = _check_rows(rows, fmt, _checked_page_size(fmt, page_size))
    cache = allocate_mla_cache(fmt, n_blocks, page_size, rows.device)
    if isinstance(fmt, MLACacheFormat):
        cache.copy_(quantize_mla_rows(rows, fmt).reshape(cache.shape))
        return cache
    data, scales = block_regions(cache, fmt)
    new_data, new_scales = quantize_block_rows(rows, fmt)
    data.copy_(new_data.reshape(data.shape))
    scales.copy_(new_scales.reshape(scales.shape))
    return cache


def dequantize_mla_pages(cache: torch.Tensor, fmt: MLACacheFormat | MLABlockFormat) -> torch.Tensor:
    """A cache [n_blocks, page_size, 1, bytes_per_token] -> float64 rows [n_blocks * page_size,
    latent + rope] (what the kernels read)."""
    if isinstance(fmt, MLACacheFormat):
        return dequantize_mla_rows(cache.reshape(-1, fmt.bytes_per_token), fmt)
    data, scales = block_regions(cache, fmt)
    return dequantize_block_rows(data.reshape(-1, fmt.data_row_bytes), scales.reshape(-1, fmt.scale_row_bytes), fmt)


def dequantize_block_rows(data: torch.Tensor, scales: torch.Tensor, fmt: MLABlockFormat) -> torch.Tensor:
    """Data rows [n, data_row_bytes] and their scale rows [n, scale_row_bytes] (uint8) -> float64
    [n, latent + rope]."""
    n = data.shape[0]
    codes = data[:, :fmt.latent_dim].contiguous().view(torch.float8_e4m3fn).double()
    scale = ue8m0_values(scales[:, :fmt.n_scales])
    latent = (codes.reshape(n, fmt.n_scales, fmt.group) * scale[..., None]).reshape(n, fmt.latent_dim)
    rope = data[:, fmt.latent_dim:].contiguous().view(torch.bfloat16).double()
    return torch.cat([latent, rope], dim=1)


def dequantize_mla_slots(cache: torch.Tensor, fmt: MLACacheFormat | MLABlockFormat, slots: torch.Tensor) -> torch.Tensor:
    """Only the rows of `slots` (valid ones: block * page_size + offset, int64 [n]) of a cache of
    either format, as float64 [n, latent + rope]: a reference reads what it needs, not the cache."""
    block, offset = slots // cache.shape[1], slots % cache.shape[1]
    if isinstance(fmt, MLACacheFormat):
        return dequantize_mla_rows(cache[block, offset, 0], fmt)
    data, scales = block_regions(cache, fmt)
    return dequantize_block_rows(data[block, offset], scales[block, offset], fmt)


__all__ = ["FP8_MAX", "INDEX_FORMATS", "MAX_PAGE_SIZE", "MLA_FORMATS", "UE8M0_BIAS", "UE8M0_NAN", "IndexCacheFormat",
           "MLABlockFormat", "MLACacheFormat", "allocate_mla_cache", "block_regions", "check_mla_page_size",
           "check_page_size", "dequantize_block_rows", "dequantize_mla_pages", "dequantize_mla_rows",
           "dequantize_mla_slots", "mla_block_bytes", "pack_index_pages",
           "pow2_scale", "quantize_block_rows", "quantize_mla_pages", "quantize_mla_rows", "ue8m0_exponents",
           "ue8m0_values", "unpack_index_pages"]
