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

from ..cache_formats import AMAX_FLOOR, FP8_MAX, quantize_mla_rows
from ..verify import Mismatch
from . import register
from .base import WORKLOAD_NEXT_N, Call, Cost, Op, S, check_tensor, generator, mla_format, next_pow2

SLOT_DTYPES = (torch.int32, torch.int64)


def min_scale_exp() -> int:
    """ceil(log2(1e-4 / 448)): the exponent of the smallest scale (amax is clamped at 1e-4)."""
    return math.ceil(math.log2(AMAX_FLOOR / FP8_MAX))


def valid_slots(slot_mapping: torch.Tensor, n_slots: int) -> torch.Tensor:
    slots = slot_mapping.long()
    return (slots >= 0) & (slots < n_slots)


def expected_cache(spec, rows, slot_mapping, cache) -> torch.Tensor:
    """A copy of `cache` with quantize_mla_rows of each validly slotted row written to its slot."""
    page = spec.cache.page_size
    out = cache.clone()
    keep = valid_slots(slot_mapping, cache.shape[0] * cache.shape[1])
    slots = slot_mapping.long()[keep]
    if slots.numel():
        out[slots // page, slots % page, 0, :] = quantize_mla_rows(rows[keep], mla_format(spec)).to(out.device)
    return out


def poison_pattern(n_pages: int, page_size: int, bytes_per_token: int, device) -> torch.Tensor:
    """A cache full of a known byte pattern (byte j of page p: 73 j + 31 p + 0xA5 mod 256), so a
    check can tell every unwritten byte from a written one without a copy of the original."""
    base = ((torch.arange(page_size * bytes_per_token, device=device) * 73 + 0xA5) % 256).to(torch.uint8)
    shift = ((torch.arange(n_pages, device=device) * 31) % 256).to(torch.uint8)
    return (base[None, :] + shift[:, None]).reshape(n_pages, page_size, 1, bytes_per_token)


def naive_cache_write(rows, slot_mapping, cache, fmt, page_size: int) -> None:
    """fp32 torch ops: group amax, power-of-two scales, fp8 cast, bytes scattered by index."""
    keep = valid_slots(slot_mapping, cache.shape[0] * page_size)
    slots, x = slot_mapping.long()[keep], rows[keep]
    n = x.shape[0]
    latent = x[:, :fmt.latent_dim].float().reshape(n, fmt.n_scales, fmt.group)
    scale = torch.exp2(torch.ceil(torch.log2(latent.abs().amax(-1).clamp_min(AMAX_FLOOR) / FP8_MAX)))
    codes = (latent / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    row = torch.cat([codes.view(torch.uint8).reshape(n, -1), scale.view(torch.uint8).reshape(n, -1),
                     x[:, fmt.latent_dim:].contiguous().view(torch.uint8)], dim=1)
    cache[slots // page_size, slots % page_size, 0, :] = row


class MLACacheWriteOp(Op):
    name = "mla_cache_write"
    position = 50
    summary = "cache writer: bf16 rows + slot mapping -> the paged FP8 MLA cache (in place, exact quantization)"
    backends = ("triton", "tvm")
    needs_cache = True
    outputs = ()
    short_names = {"block_r": "r", "num_warps": "w"}
    naive_name = "fp32 quantize + index_put"
    args = (("rows", "Tensor"), ("slot_mapping", "Tensor"), ("cache", "Tensor(a!)"))

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

    def reference(self, spec, rows, slot_mapping, cache):
        return expected_cache(spec, rows, slot_mapping, cache)

    def inputs(self, spec, S_, SKV_, device, seed):
        """B = S_ requests of SKV_ tokens each in shuffled pages; each writes its last WORKLOAD_NEXT_N tokens
        (rows of mixed magnitudes), about one row in eight is padding (-1); the cache holds the
        poison pattern."""
        fmt, page = mla_format(spec), spec.cache.page_size
        g = generator(device, seed)
        per_req = -(-SKV_ // page)
        n_pages = S_ * per_req
        table = torch.randperm(n_pages, device=device, generator=g).reshape(S_, per_req)
        pos = torch.arange(SKV_ - WORKLOAD_NEXT_N, SKV_, device=device)  # [WORKLOAD_NEXT_N]; < 0: a context too short
        slots = table[:, pos.clamp_min(0) // page] * page + pos.clamp_min(0) % page
        pad = (torch.rand(slots.shape, device=device, generator=g) < 0.125) | (pos < 0)[None, :]
        slots = torch.where(pad, -1, slots).reshape(-1).to(torch.int32)
        n = slots.numel()
        mag = torch.exp2(torch.randint(-30, 30, (n, 1), device=device, generator=g).float())
        rows = (torch.randn(n, fmt.latent_dim + fmt.rope_dim, device=device, generator=g) * mag).bfloat16()
        cache = poison_pattern(n_pages, page, fmt.bytes_per_token, device)
        return (rows, slots, cache)

    def poisoned_outputs(self, spec, inputs):
        return {}  # the cache is the output: inputs() fills it with the poison pattern

    def check(self, spec, inputs, result, rows):
        """Bitwise: the whole cache against the poison pattern with the quantized rows written in
        (`rows` is not needed: every row is checked)."""
        x, slots, cache = inputs
        fmt, page = mla_format(spec), spec.cache.page_size
        want = expected_cache(spec, x, slots, poison_pattern(cache.shape[0], page, fmt.bytes_per_token, cache.device))
        bad = cache != want
        if bool(bad.any()):
            tokens = bad.reshape(-1, fmt.bytes_per_token).any(-1).nonzero().flatten()[:5].tolist()
            raise Mismatch(f"mla_cache_write: {int(bad.sum())} cache bytes differ, in token slots {tokens}...")
        written = int(valid_slots(slots, cache.shape[0] * page).sum())
        return f"bitwise: {written} written slots equal quantize_mla_rows, {cache.numel()} bytes checked"

    def naive(self, spec, inputs):
        fmt, page = mla_format(spec), spec.cache.page_size
        return lambda: naive_cache_write(*inputs, fmt, page)

    def call_shape(self, S_, SKV_):
        return 2 * S_, SKV_  # the workload's B requests x next_n = 2 query rows; each row's context

    def shape_info(self, spec, S_, SKV_):
        fmt = mla_format(spec)
        return {"S": S_, "SKV": SKV_, "B": S_, "next_n": WORKLOAD_NEXT_N, "page": spec.cache.page_size,
                "bytes_per_token": fmt.bytes_per_token}


register(MLACacheWriteOp())
