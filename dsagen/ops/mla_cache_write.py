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

Workload (tuner, bench): S = B requests, each writing next_n = 2 new tokens (the last two of its
SKV-token context) into a cache of B x SKV tokens whose pages are shuffled; about one row in eight
is padding (slot -1). check_args reports (rows = B * next_n, the cache's tokens per request), so
the workload's (B, SKV) comes back as (2B, SKV rounded up to whole pages).
"""
from __future__ import annotations

import math

import sympy as sp
import torch

from ..cache_formats import AMAX_FLOOR, FP8_MAX
from ..plan import Cost, S, next_pow2
from .base import DECODE_TUNING, Call, Op
from .checks import check_tensor
from .shared import WORKLOAD_NEXT_N, mla_format
from .signature import Signature, tensor

SLOT_DTYPES = (torch.int32, torch.int64)


def min_scale_exp() -> int:
    """ceil(log2(1e-4 / 448)): the exponent of the smallest scale (amax is clamped at 1e-4)."""
    return math.ceil(math.log2(AMAX_FLOOR / FP8_MAX))



class MLACacheWriteOp(Op):
    name = "mla_cache_write"
    position = 50
    summary = "cache writer: bf16 rows + slot mapping -> the paged FP8 MLA cache (in place, exact quantization)"
    backends = ("triton", "tvm")
    doc = ("Write bf16 rows [n, qk_dim] into the paged FP8 MLA cache at slot_mapping [n] (page *\n"
           "page_size + offset; negative or out-of-range slots are skipped), quantized exactly as\n"
           "dsagen.cache_formats.quantize_mla_rows.")
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
                "page_size": spec.cache.page_size}

    def module_stem(self, spec):
        f = self.template_fields(spec)
        return f"mla_cache_write_l{f['latent_dim']}_r{f['rope_dim']}_g{f['group']}_p{f['page_size']}"

    def derived(self, spec, point, backend):
        fmt = mla_format(spec)
        return {"n_scales": fmt.n_scales, "group_pad": next_pow2(fmt.group), "rope_pad": next_pow2(2 * fmt.rope_dim),
                "scale_offset": fmt.scale_offset, "rope_offset": fmt.rope_offset,
                "bytes_per_token": fmt.bytes_per_token, "min_scale_exp": min_scale_exp()}

    def problem_symbols(self, spec):
        fmt = mla_format(spec)
        return {"group_pad": next_pow2(fmt.group), "rope_pad": next_pow2(2 * fmt.rope_dim),
                "latent_dim": fmt.latent_dim}

    def cost(self, spec):
        fmt = mla_format(spec)
        n = WORKLOAD_NEXT_N * S  # rows written per step
        nbytes = n * (2 * (fmt.latent_dim + fmt.rope_dim) + 4 + fmt.bytes_per_token)  # rows, slots, cache rows
        return Cost(self.name, sp.Integer(0), nbytes, "none")

    def check_args(self, spec, rows, slot_mapping, cache):
        fmt = mla_format(spec)
        check_tensor("rows", rows, torch.bfloat16, (None, fmt.latent_dim + fmt.rope_dim))
        dev, n = rows.device, rows.shape[0]
        if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype not in SLOT_DTYPES:
            got = slot_mapping.dtype if isinstance(slot_mapping, torch.Tensor) else type(slot_mapping).__name__
            raise ValueError(f"slot_mapping must be an int32 or int64 tensor, got {got}")
        check_tensor("slot_mapping", slot_mapping, slot_mapping.dtype, (n,), dev, contiguous_last=False)
        page = spec.cache.page_size
        check_tensor("cache", cache, torch.uint8, (None, page, 1, fmt.bytes_per_token), dev)
        n_pages = cache.shape[0]
        if n_pages and (cache.stride(1) < fmt.bytes_per_token
                        or (n_pages > 1 and cache.stride(0) < page * cache.stride(1))):
            raise ValueError(f"cache must hold each token's {fmt.bytes_per_token} bytes apart from the others "
                             f"(token stride >= {fmt.bytes_per_token}, page stride >= page_size x token stride), "
                             f"got strides {cache.stride()}")
        requests = -(-n // WORKLOAD_NEXT_N)
        return Call(dev, n, (n_pages * page) // requests if requests else n_pages * page)

    def fake(self, spec, rows, slot_mapping, cache):
        return None


MLA_CACHE_WRITE = MLACacheWriteOp()
