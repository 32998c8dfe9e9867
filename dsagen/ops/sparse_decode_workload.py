"""The sparse decode's workload: B requests of SKV tokens in a shared cache of shuffled pages,
next_n = 2 query tokens each, k distinct random slots of each token's causal context (about 1 in
64 replaced by -1); checked against the float64 reference on sampled requests."""
from __future__ import annotations

import math

import torch

from ..cache_formats import (UE8M0_BIAS, UE8M0_NAN, MLABlockFormat, MLACacheFormat, allocate_mla_cache,
                             block_regions, dequantize_mla_slots)
from ..verify import assert_close
from .checks import softmax_scale
from .shared import WORKLOAD_NEXT_N, mla_format
from .workload import Workload, generator


def _valid_slots(indices: torch.Tensor, n_slots: int, length) -> torch.Tensor:
    """The valid entries (0 <= slot < n_slots) among the first `length` of a token's indices (all
    of them for None; none for length <= 0)."""
    idx = indices.long()
    if length is not None:
        idx = idx[:max(0, int(length))]
    return idx[(idx >= 0) & (idx < n_slots)]


def _selected_rows(cache, fmt, indices, length) -> torch.Tensor:
    """float64 [n, latent + rope] on the host: the dequantized rows of a token's valid selected slots
    (gathered where the cache is; nothing else of the cache is read)."""
    slots = _valid_slots(indices.cpu(), cache.shape[0] * cache.shape[1], length)
    return dequantize_mla_slots(cache, fmt, slots.to(cache.device)).cpu()


def reference_sparse_decode(q, mla_cache, indices, sm_scale: float, fmt, attn_sink=None, topk_length=None,
                            extra_cache=None, extra_indices=None, extra_topk_length=None):
    """Float64 from the math: per token, dequantize its valid selected rows of both selections
    exactly (fp8 * scale, rope as bf16; the codecs of dsagen.cache_formats) and take one softmax over
    them; V is fmt.v_dim columns of the rows. Request b's tokens use the first topk_length[b]
    (extra_topk_length[b]) indices. The sink: out *= 1 / (1 + exp(sink[h] - lse)), lse unchanged.
    Returns (out [B, s_q, H, v_dim], lse [B, s_q, H]); a token without a valid index: 0 and +inf."""
    B, s_q, heads, _ = q.shape
    v_dim = fmt.v_dim
    selections = [(mla_cache, indices, topk_length)]
    if extra_cache is not None:
        selections.append((extra_cache, extra_indices, extra_topk_length))
    out = torch.zeros(B, s_q, heads, v_dim, dtype=torch.float64)
    lse = torch.full((B, s_q, heads), math.inf, dtype=torch.float64)
    for b in range(B):
        for t in range(s_q):
            rows = torch.cat([_selected_rows(cache, fmt, idx[b, t], None if n is None else n[b])
                              for cache, idx, n in selections])
            if rows.shape[0] == 0:
                continue
            scores = sm_scale * (q[b, t].cpu().double() @ rows.T)  # [H, n]
            lse[b, t] = torch.logsumexp(scores, dim=-1)
            out[b, t] = torch.softmax(scores, dim=-1) @ rows[:, :v_dim]
    if attn_sink is not None:
        sink = attn_sink.cpu().double()
        weight = torch.where(lse == math.inf, 1.0, 1.0 / (1.0 + torch.exp(sink - lse)))
        out *= weight[..., None]
    return out, lse


def dequantize_gathered(raw: torch.Tensor, fmt: MLACacheFormat) -> torch.Tensor:
    """uint8 rows [..., bytes_per_token] -> bf16 [..., latent + rope] with torch (naive baseline)."""
    shape = raw.shape[:-1]
    flat = raw.reshape(-1, fmt.bytes_per_token)
    codes = flat[:, :fmt.latent_dim].contiguous().view(torch.float8_e4m3fn).float()
    scales = flat[:, fmt.scale_offset:fmt.rope_offset].contiguous().view(torch.float32)
    latent = codes * scales.repeat_interleave(fmt.group, dim=1)
    rope = flat[:, fmt.rope_offset:].contiguous().view(torch.bfloat16)
    return torch.cat([latent.bfloat16(), rope], dim=1).reshape(*shape, -1)


def gathered_block_rows(cache: torch.Tensor, slots: torch.Tensor, fmt: MLABlockFormat) -> torch.Tensor:
    """The rows of valid slots [...] of a block-format cache -> bf16 [..., latent + rope] with torch
    (naive baseline): fp8 * 2^(e - 127) in fp32, rounded once to bf16."""
    data, scales = block_regions(cache, fmt)
    block, offset = slots // cache.shape[1], slots % cache.shape[1]
    raw, exponents = data[block, offset], scales[block, offset, :fmt.n_scales].float()
    codes = raw[..., :fmt.latent_dim].contiguous().view(torch.float8_e4m3fn).float()
    scale = torch.where(exponents == UE8M0_NAN, math.nan, torch.exp2(exponents - UE8M0_BIAS))
    latent = (codes.unflatten(-1, (fmt.n_scales, fmt.group)) * scale[..., None]).flatten(-2)
    return torch.cat([latent.bfloat16(), raw[..., fmt.latent_dim:].contiguous().view(torch.bfloat16)], dim=-1)


def naive_sparse_decode(q, mla_cache, indices, sm_scale: float, fmt, chunk: int = 64):
    """Gather the selected cache rows, dequantize them with torch, dense bf16 attention over them,
    in chunks of query tokens."""
    B, s_q, heads, dqk = q.shape
    qf, idx = q.reshape(B * s_q, heads, dqk), indices.reshape(B * s_q, -1)
    n_slots = mla_cache.shape[0] * mla_cache.shape[1]
    if isinstance(fmt, MLABlockFormat):
        gather = lambda slots: gathered_block_rows(mla_cache, slots, fmt)  # noqa: E731
    else:
        gather = lambda slots: dequantize_gathered(mla_cache.reshape(-1, fmt.bytes_per_token)[slots], fmt)  # noqa: E731
    v_dim = fmt.v_dim
    out = torch.empty(B * s_q, heads, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * s_q, heads, dtype=torch.float32, device=q.device)
    for s0 in range(0, B * s_q, chunk):
        ix = idx[s0:s0 + chunk].long()
        valid = (ix >= 0) & (ix < n_slots)
        rows = gather(ix.clamp(0, n_slots - 1))  # [c, k, D]
        scores = torch.einsum("chd,ckd->chk", qf[s0:s0 + chunk], rows).float() * sm_scale
        scores = scores.masked_fill(~valid[:, None, :], -math.inf)
        lse[s0:s0 + chunk] = torch.logsumexp(scores, -1)
        p = torch.softmax(scores, -1).nan_to_num(0.0).to(q.dtype)
        out[s0:s0 + chunk] = torch.einsum("chk,ckd->chd", p, rows[..., :v_dim])
    return out.reshape(B, s_q, heads, -1), lse.reshape(B, s_q, heads)


def random_mla_cache(n_slots: int, page_size: int, fmt, g: torch.Generator, device,
                     chunk: int = 1 << 20) -> torch.Tensor:
    """A filled cache [n_slots / page_size, page_size, 1, bytes_per_token]: fp8 codes of about 16 x
    N(0, 1), power-of-two scales 2^-5..2^-3 (values of about N(0, 1)), bf16 N(0, 1) rope; written
    in chunks of slots so no float copy of the whole cache exists. A block format's blocks are
    padded (allocate_mla_cache)."""
    if isinstance(fmt, MLABlockFormat):
        return _random_block_cache(n_slots // page_size, page_size, fmt, g, device, max(1, chunk // page_size))
    cache = torch.empty(n_slots, fmt.bytes_per_token, dtype=torch.uint8, device=device)
    for s0 in range(0, n_slots, chunk):
        n = min(chunk, n_slots - s0)
        codes = (torch.randn(n, fmt.latent_dim, device=device, generator=g) * 16).to(torch.float8_e4m3fn)
        scales = torch.exp2(torch.randint(-5, -2, (n, fmt.n_scales), device=device, generator=g).float())
        rope = torch.randn(n, fmt.rope_dim, device=device, generator=g).bfloat16()
        cache[s0:s0 + n, :fmt.latent_dim] = codes.view(torch.uint8)
        cache[s0:s0 + n, fmt.scale_offset:fmt.rope_offset] = scales.view(torch.uint8)
        cache[s0:s0 + n, fmt.rope_offset:] = rope.view(torch.uint8)
    return cache.reshape(n_slots // page_size, page_size, 1, fmt.bytes_per_token)


def _random_block_cache(n_blocks: int, page_size: int, fmt: MLABlockFormat, g: torch.Generator, device,
                        chunk: int) -> torch.Tensor:
    """random_mla_cache's values in a block-format cache, `chunk` blocks at a time."""
    cache = allocate_mla_cache(fmt, n_blocks, page_size, device)
    data, scales = block_regions(cache, fmt)
    for b0 in range(0, n_blocks, chunk):
        nb = min(chunk, n_blocks - b0)
        n = nb * page_size
        codes = (torch.randn(n, fmt.latent_dim, device=device, generator=g) * 16).to(torch.float8_e4m3fn)
        exponents = torch.randint(UE8M0_BIAS - 5, UE8M0_BIAS - 2, (n, fmt.n_scales), device=device, generator=g)
        rope = torch.randn(n, fmt.rope_dim, device=device, generator=g).bfloat16()
        data[b0:b0 + nb, :, :fmt.latent_dim] = codes.view(torch.uint8).reshape(nb, page_size, -1)
        data[b0:b0 + nb, :, fmt.latent_dim:] = rope.view(torch.uint8).reshape(nb, page_size, -1)
        scales[b0:b0 + nb, :, :fmt.n_scales] = exponents.to(torch.uint8).reshape(nb, page_size, -1)
    return cache


class SparseDecodeWorkload(Workload):
    kernel = "sparse_decode"
    naive_name = "gather + torch dequantize + einsum + softmax (bf16, chunks of 64 tokens)"
    # The reference uses the exact dequantized rows (fp8 * scale); the kernel rounds fp32(code) * scale
    # to bf16 (exact for the format's power-of-two scales, 2**-9 relative otherwise), then rounds P
    # and the output to bf16 like the prefill attention, so the same bounds.
    tolerances = {"out": 1e-2, "lse": 1e-4}


    def reference(self, spec, q, mla_cache, indices, sm_scale=None, **optional):
        """The float64 reference of a call: the spec's cache format, the optional inputs by name."""
        scale = softmax_scale(spec, sm_scale)
        return reference_sparse_decode(q, mla_cache, indices, scale, mla_format(spec), **optional)

    def inputs(self, spec, S_, SKV_, device, seed):
        """B = S_ requests of SKV_ tokens each in a shared cache of pages in a random order; q for
        WORKLOAD_NEXT_N tokens per request; per token, k distinct random slots of its causal context
        (token j sees SKV_ - WORKLOAD_NEXT_N + j + 1 tokens), about 1 in 64 replaced by -1, -1 padded."""
        at, k, fmt, page_size = spec.attention, spec.topk.k, mla_format(spec), spec.cache.page_size
        g = generator(device, seed)
        pages_per_req = -(-SKV_ // page_size)
        cache = random_mla_cache(S_ * pages_per_req * page_size, page_size, fmt, g, device)
        table = torch.randperm(S_ * pages_per_req, device=device, generator=g).reshape(S_, pages_per_req)
        q = torch.randn(S_, WORKLOAD_NEXT_N, at.heads, at.qk_dim, device=device, generator=g).bfloat16()
        seen = torch.arange(SKV_ - WORKLOAD_NEXT_N + 1, SKV_ + 1, device=device).clamp_min(1)  # tokens each query sees
        keys = torch.rand(S_, WORKLOAD_NEXT_N, SKV_, device=device, generator=g)
        keys = keys.masked_fill(torch.arange(SKV_, device=device) >= seen[:, None], -1.0)
        vals, pos = keys.topk(min(k, SKV_), dim=-1)
        slots = table.gather(1, (pos // page_size).reshape(S_, -1)).reshape(pos.shape) * page_size + pos % page_size
        drop = torch.rand(pos.shape, device=device, generator=g) < 1 / 64
        idx = torch.where((vals >= 0) & ~drop, slots, -1).int()
        if k > SKV_:
            idx = torch.cat([idx, idx.new_full((S_, WORKLOAD_NEXT_N, k - SKV_), -1)], dim=-1)
        return (q, cache, idx.contiguous(), at.softmax_scale)

    def poisoned_outputs(self, spec, inputs):
        q = inputs[0]
        B, s_q = q.shape[:2]
        at = spec.attention
        return {"out": torch.full((B, s_q, at.heads, at.v_dim), math.nan, dtype=q.dtype, device=q.device),
                "lse": torch.full((B, s_q, at.heads), math.nan, device=q.device)}

    def check(self, spec, inputs, result, rows):
        """`rows` are requests (the workload's S): all their query tokens are checked."""
        q, cache, idx, sm_scale = inputs
        out, lse = result
        r = rows.to(q.device)
        ref_out, ref_lse = reference_sparse_decode(q[r], cache, idx[r], sm_scale, mla_format(spec))
        r1 = assert_close("sparse_decode.out", out[r], ref_out, self.tolerance("out"))
        r2 = assert_close("sparse_decode.lse", lse[r], ref_lse, self.tolerance("lse"))
        return f"float64 reference on {len(rows)} requests, RMS ratio out {r1:.2e}, lse {r2:.2e}"

    def naive(self, spec, inputs):
        return lambda: naive_sparse_decode(*inputs, mla_format(spec))

    def call_shape(self, S_, SKV_):
        return 2 * S_, SKV_  # the workload's B requests x next_n = 2 query rows; each row's context

    def shape_info(self, spec, S_, SKV_):
        at = spec.attention
        return {"S": S_, "SKV": SKV_, "B": S_, "next_n": WORKLOAD_NEXT_N, "context": SKV_, "H": at.heads,
                "Dqk": at.qk_dim, "Dv": at.v_dim, "topk": spec.topk.k, "page": spec.cache.page_size,
                "cache": spec.cache.mla_format}

    def sizes(self, S_, SKV_):
        return {"S": S_, "SKV": SKV_, "W": SKV_}


WORKLOAD = SparseDecodeWorkload()
