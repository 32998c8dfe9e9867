"""The cache writer's workload: B requests of SKV tokens in shuffled pages, each writing its last
next_n = 2 tokens (about one row in eight padding), into a cache filled with a known byte pattern;
checked bitwise against the host codec (quantize_mla_rows, or quantize_block_rows for page blocks)."""
from __future__ import annotations

import torch

from ..cache_formats import (AMAX_FLOOR, FP8_MAX, MLABlockFormat, block_regions, mla_block_bytes, quantize_block_rows,
                             quantize_mla_rows)
from ..verify import Mismatch
from .shared import WORKLOAD_NEXT_N, mla_format
from .workload import Workload, generator


def valid_slots(slot_mapping: torch.Tensor, n_slots: int) -> torch.Tensor:
    slots = slot_mapping.long()
    return (slots >= 0) & (slots < n_slots)


def expected_cache(spec, rows, slot_mapping, cache) -> torch.Tensor:
    """A copy of `cache` (its whole storage: a block format's padding too) with the host codec's
    bytes of each validly slotted row written to its slot."""
    page, fmt = spec.cache.page_size, mla_format(spec)
    out = storage_bytes(cache).clone().as_strided(cache.shape, cache.stride(), cache.storage_offset())
    keep = valid_slots(slot_mapping, cache.shape[0] * cache.shape[1])
    slots = slot_mapping.long()[keep]
    if not slots.numel():
        return out
    if isinstance(fmt, MLABlockFormat):
        data, scales = block_regions(out, fmt)
        new_data, new_scales = quantize_block_rows(rows[keep], fmt)
        data[slots // page, slots % page] = new_data.to(out.device)
        scales[slots // page, slots % page] = new_scales.to(out.device)
    else:
        out[slots // page, slots % page, 0, :] = quantize_mla_rows(rows[keep], fmt).to(out.device)
    return out


def poison_pattern(n_pages: int, page_size: int, bytes_per_token: int, device, block_bytes: int | None = None
                   ) -> torch.Tensor:
    """A cache full of a known byte pattern (byte j of page p: 73 j + 31 p + 0xA5 mod 256), so a
    check can tell every unwritten byte from a written one without a copy of the original. With
    block_bytes (a block format's padded block size) the pages lie that far apart, the padding
    poisoned too."""
    width = page_size * bytes_per_token if block_bytes is None else block_bytes
    base = ((torch.arange(width, device=device) * 73 + 0xA5) % 256).to(torch.uint8)
    shift = ((torch.arange(n_pages, device=device) * 31) % 256).to(torch.uint8)
    storage = base[None, :] + shift[:, None]
    return storage[:, :page_size * bytes_per_token].view(n_pages, page_size, 1, bytes_per_token)


def poisoned_cache(spec, n_pages: int, device) -> torch.Tensor:
    """The poison pattern in the spec's cache layout (a block format's blocks padded as
    allocate_mla_cache pads them)."""
    fmt, page = mla_format(spec), spec.cache.page_size
    return poison_pattern(n_pages, page, fmt.bytes_per_token, device, mla_block_bytes(fmt, page))


def storage_bytes(cache: torch.Tensor) -> torch.Tensor:
    """Every byte of a cache view's storage, padding included, as one flat uint8 tensor."""
    return cache.as_strided((cache.untyped_storage().nbytes(),), (1,), 0)


def naive_cache_write(rows, slot_mapping, cache, fmt, page_size: int) -> None:
    """fp32 torch ops: group amax, power-of-two scales, fp8 cast, bytes scattered by index (a block
    format: its host codec's torch ops, scattered into the block's two regions)."""
    keep = valid_slots(slot_mapping, cache.shape[0] * page_size)
    slots, x = slot_mapping.long()[keep], rows[keep]
    if isinstance(fmt, MLABlockFormat):
        data, scales = block_regions(cache, fmt)
        new_data, new_scales = quantize_block_rows(x, fmt)
        data[slots // page_size, slots % page_size] = new_data
        scales[slots // page_size, slots % page_size] = new_scales
        return
    n = x.shape[0]
    latent = x[:, :fmt.latent_dim].float().reshape(n, fmt.n_scales, fmt.group)
    scale = torch.exp2(torch.ceil(torch.log2(latent.abs().amax(-1).clamp_min(AMAX_FLOOR) / FP8_MAX)))
    codes = (latent / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    row = torch.cat([codes.view(torch.uint8).reshape(n, -1), scale.view(torch.uint8).reshape(n, -1),
                     x[:, fmt.latent_dim:].contiguous().view(torch.uint8)], dim=1)
    cache[slots // page_size, slots % page_size, 0, :] = row


class MLACacheWriteWorkload(Workload):
    kernel = "mla_cache_write"
    naive_name = "fp32 quantize + index_put"

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
        rows = (torch.randn(n, fmt.qk_dim, device=device, generator=g) * mag).bfloat16()
        return (rows, slots, poisoned_cache(spec, n_pages, device))

    def poisoned_outputs(self, spec, inputs):
        return {}  # the cache is the output: inputs() fills it with the poison pattern

    def check(self, spec, inputs, result, rows):
        """Bitwise: the whole cache (every page's bytes) against the poison pattern with the quantized
        rows written in (`rows` is not needed: every row is checked)."""
        x, slots, cache = inputs
        page = spec.cache.page_size
        want = expected_cache(spec, x, slots, poisoned_cache(spec, cache.shape[0], cache.device))
        bad = (cache != want).reshape(cache.shape[0], -1)
        if bool(bad.any()):
            pages = bad.any(-1).nonzero().flatten()[:5].tolist()
            raise Mismatch(f"mla_cache_write: {int(bad.sum())} cache bytes differ, in pages {pages}...")
        written = int(valid_slots(slots, cache.shape[0] * page).sum())
        return f"bitwise: {written} written slots equal the host codec's, {cache.numel()} bytes checked"

    def naive(self, spec, inputs):
        fmt, page = mla_format(spec), spec.cache.page_size
        return lambda: naive_cache_write(*inputs, fmt, page)

    def call_shape(self, S_, SKV_):
        return 2 * S_, SKV_  # the workload's B requests x next_n = 2 query rows; each row's context

    def shape_info(self, spec, S_, SKV_):
        fmt = mla_format(spec)
        return {"S": S_, "SKV": SKV_, "B": S_, "next_n": WORKLOAD_NEXT_N, "page": spec.cache.page_size,
                "bytes_per_token": fmt.bytes_per_token}


WORKLOAD = MLACacheWriteWorkload()
