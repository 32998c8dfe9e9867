"""Paged KV-cache formats of the decode path, as data: a new format is a new table entry.

Two caches, both paged (a page holds `page_size` consecutive tokens of one request; a request's
block table lists its pages):

- the MLA cache of sparse attention, one row of `bytes_per_token` bytes per token:
  `latent_dim` fp8 e4m3 values | one fp32 scale per `group` latent values | `rope_dim` bf16 values.
  DeepSeek-V3.2 (FlashMLA's FP8 sparse decode): 512 | 4 x fp32 | 64 x bf16 = 656 B/token. The
  scales are powers of two, 2^ceil(log2(amax / 448)) with amax clamped at 1e-4, so a latent value
  is `fp8 * scale` exactly.
- the indexer key cache (DeepGEMM's paged layout): per page, the page's `page_size x head_dim` fp8
  keys first, then their `page_size` fp32 scales; `head_dim + 4` bytes per token.

The float64 codecs here (quantize on the host, dequantize for references) are what the kernels'
outputs are checked against.
"""
from __future__ import annotations

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


MLA_FORMATS = {
    "deepseek_v32_fp8": MLACacheFormat("deepseek_v32_fp8", latent_dim=512, rope_dim=64, group=128),
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


def check_page_size(page_size: int) -> str | None:
    """What is wrong with a page size, or None (a power of two from 1 to 1024: tiles index pages)."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1 or page_size > 1024 \
            or page_size & (page_size - 1):
        return "must be a power of two from 1 to 1024"
    return None


__all__ = ["FP8_MAX", "INDEX_FORMATS", "MLA_FORMATS", "IndexCacheFormat", "MLACacheFormat", "check_page_size",
           "dequantize_mla_rows", "pack_index_pages", "pow2_scale", "quantize_mla_rows", "unpack_index_pages"]
