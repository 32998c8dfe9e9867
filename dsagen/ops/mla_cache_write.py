"""The decode path's cache writer: bf16 rows + a slot mapping -> the paged FP8 MLA cache, in place.

What an engine calls after each step to store the step's new kv rows. Row i (latent | rope, bf16)
goes to token slot `slot_mapping[i]` = page * page_size + offset of `cache` (uint8 [n_pages,
page_size, 1, bytes_per_token], FlashMLA's k_cache layout), quantized exactly as
`dsagen.cache_formats.quantize_mla_rows`: bitwise the same bytes. A negative slot skips its row
(engines pad); so does a slot >= n_pages * page_size (the host cannot check it without a sync),
so the kernel never writes out of bounds. Every byte outside the written slots keeps its value.
Two rows naming the same slot race (engines give distinct slots). Non-finite values: a group
holding NaN gets a NaN scale and NaN codes, one holding +-inf an inf scale (what the host codec
gives on x86). The templates quantize with integer bit operations: exact in both Triton renderings
and on both TVM targets (llvm, cuda).

The spec's cache.mla_format picks the rendering. A row format (deepseek_v32_fp8) is the above. A
block format (deepseek_v4_fp8, FlashMLA's MODEL1) takes rows [n, 512] (448 NoPE | 64 RoPE) and a
cache whose [n_blocks, page_size, 1, 584] view has the padded block stride of
`dsagen.cache_formats.allocate_mla_cache`: the token's data row [448 fp8 | 64 bf16] goes to its
offset in the block's first region, its scale row [7 ue8m0 | 0] to the region after the page's data
rows, bitwise as `dsagen.cache_formats.quantize_mla_pages`; a group holding NaN or +-inf gets the
ue8m0 NaN byte 0xFF and NaN codes. The blocks' padding is never written.

Workload (tuner, bench): S = B requests, each writing next_n = 2 new tokens (the last two of its
SKV-token context) into a cache of B x SKV tokens whose pages are shuffled; about one row in eight
is padding (slot -1). check_args reports (rows = B * next_n, the cache's tokens per request), so
the workload's (B, SKV) comes back as (2B, SKV rounded up to whole pages).
"""
from __future__ import annotations

import math

import sympy as sp
import torch

from ..cache_formats import AMAX_FLOOR, FP8_MAX, MLABlockFormat, MLACacheFormat, block_regions
from ..plan import Cost, S, next_pow2
from .base import DECODE_TUNING, Call, Op
from .checks import check_tensor
from .shared import WORKLOAD_NEXT_N, mla_format
from .signature import Signature, tensor

SLOT_DTYPES = (torch.int32, torch.int64)


def min_scale_exp(fmt: MLACacheFormat | MLABlockFormat | None = None) -> int:
    """The exponent of the format's smallest scale: ceil(log2(1e-4 / 448)) for the row formats (amax
    is clamped at 1e-4), ceil(log2(scale_floor)) for the block formats (amax / 448 is)."""
    if isinstance(fmt, MLABlockFormat):
        return math.ceil(math.log2(fmt.scale_floor))
    return math.ceil(math.log2(AMAX_FLOOR / FP8_MAX))


def format_layout(fmt: MLACacheFormat | MLABlockFormat) -> dict:
    """Where a token's bytes go, as template numbers. A row format: one row of bytes_per_token
    (codes | fp32 scales at scale_offset | rope at rope_offset). A block format: a data row of
    data_row_bytes (codes | rope at rope_offset) in the block's first region, and a scale row of
    scale_row_bytes (ue8m0 bytes, then zeros) in the region after the page's data rows."""
    if isinstance(fmt, MLABlockFormat):
        return {"block_format": True, "data_row_bytes": fmt.data_row_bytes, "scale_row_bytes": fmt.scale_row_bytes,
                "scale_offset": 0, "rope_offset": fmt.latent_dim}
    return {"block_format": False, "data_row_bytes": fmt.bytes_per_token, "scale_row_bytes": 4 * fmt.n_scales,
            "scale_offset": fmt.scale_offset, "rope_offset": fmt.rope_offset}



class MLACacheWriteOp(Op):
    name = "mla_cache_write"
    position = 50
    summary = "cache writer: bf16 rows + slot mapping -> the paged FP8 MLA cache (in place, exact quantization)"
    backends = ("triton", "tvm")
    doc = ("Write bf16 rows [n, latent + rope] into the paged FP8 MLA cache at slot_mapping [n] (page *\n"
           "page_size + offset; negative or out-of-range slots are skipped), quantized exactly as\n"
           "dsagen.cache_formats.quantize_mla_pages (V3.2 rows or V4 page blocks, by cache.mla_format).")
    needs_cache = True
    short_names = {"block_r": "r", "num_warps": "w"}
    signature = Signature((tensor("rows"), tensor("slot_mapping"), tensor("cache", mutated=True)), returns=())
    tuning = DECODE_TUNING

    def semantic_fields(self, spec):
        if spec.cache is None:
            return {}
        return {"mla_format": spec.cache.mla_format, "page_size": spec.cache.page_size}

    def template_fields(self, spec):
        fmt = mla_format(spec)
        return {"latent_dim": fmt.latent_dim, "rope_dim": fmt.rope_dim, "group": fmt.group,
                "page_size": spec.cache.page_size, "block_format": isinstance(fmt, MLABlockFormat)}

    def module_stem(self, spec):
        f = self.template_fields(spec)
        kind = "_blocks" if f["block_format"] else ""  # the V4 page blocks, else one row per token
        return f"mla_cache_write{kind}_l{f['latent_dim']}_r{f['rope_dim']}_g{f['group']}_p{f['page_size']}"

    def derived(self, spec, point, backend):
        fmt = mla_format(spec)
        return {"n_scales": fmt.n_scales, "group_pad": next_pow2(fmt.group), "rope_pad": next_pow2(2 * fmt.rope_dim),
                "bytes_per_token": fmt.bytes_per_token, "min_scale_exp": min_scale_exp(fmt), **format_layout(fmt)}

    def problem_symbols(self, spec):
        fmt = mla_format(spec)
        return {"group_pad": next_pow2(fmt.group), "rope_pad": next_pow2(2 * fmt.rope_dim),
                "latent_dim": fmt.latent_dim}

    def cost(self, spec):
        fmt = mla_format(spec)
        n = WORKLOAD_NEXT_N * S  # rows written per step
        nbytes = n * (2 * fmt.qk_dim + 4 + fmt.bytes_per_token)  # rows, slots, cache rows
        return Cost(self.name, sp.Integer(0), nbytes, "none")

    def check_args(self, spec, rows, slot_mapping, cache):
        fmt = mla_format(spec)
        check_tensor("rows", rows, torch.bfloat16, (None, fmt.qk_dim))
        dev, n = rows.device, rows.shape[0]
        if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype not in SLOT_DTYPES:
            got = slot_mapping.dtype if isinstance(slot_mapping, torch.Tensor) else type(slot_mapping).__name__
            raise ValueError(f"slot_mapping must be an int32 or int64 tensor, got {got}")
        check_tensor("slot_mapping", slot_mapping, slot_mapping.dtype, (n,), dev, contiguous_last=False)
        page = spec.cache.page_size
        check_tensor("cache", cache, torch.uint8, (None, page, 1, fmt.bytes_per_token), dev)
        n_pages = cache.shape[0]
        if isinstance(fmt, MLABlockFormat):
            block_regions(cache, fmt)  # each block's page x bytes_per_token bytes packed
        elif n_pages and (cache.stride(1) < fmt.bytes_per_token
                        or (n_pages > 1 and cache.stride(0) < page * cache.stride(1))):
            raise ValueError(f"cache must hold each token's {fmt.bytes_per_token} bytes apart from the others "
                             f"(token stride >= {fmt.bytes_per_token}, page stride >= page_size x token stride), "
                             f"got strides {cache.stride()}")
        requests = -(-n // WORKLOAD_NEXT_N)
        return Call(dev, n, (n_pages * page) // requests if requests else n_pages * page)

    def fake(self, spec, rows, slot_mapping, cache):
        return None


MLA_CACHE_WRITE = MLACacheWriteOp()
