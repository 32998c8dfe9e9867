"""Decode, sparse MLA attention over the paged FP8 MLA cache (FlashMLA's sparse FP8 decode, for any
head count and any k).

q [B, s_q, H, qk_dim] bf16 (s_q = next_n new tokens per request), mla_cache uint8
[n_pages, page_size, 1, bytes_per_token] in the spec's cache format (dsagen/cache_formats.py: fp8
latent | fp32 scales, one per group | bf16 rope; latent value = fp8 * scale), indices [B, s_q, k]
int32 slots into the cache's token axis (slot = page * page_size + offset: the page table is
already applied; invalid = negative or >= n_pages * page_size). out [B, s_q, H, latent] bf16 and
lse [B, s_q, H] fp32 (natural log): out[b,t,h] = sum_i softmax_i(sm_scale * q[b,t,h] . row_i) *
row_i[:latent] over the valid selected rows, row_i the dequantized row; a token with no valid
index gives out 0 and lse +inf; NaN as the prefill sparse attention (docs/numerics.md).

The page size is read from the tensor (any size; the spec's cache.page_size need not match):
the kernel addresses slot // page_size and slot % page_size through the cache's strides, so
padded page strides work too. Schedule: block_h heads x block_n gathered rows per step; k_split
> 1 splits each token's k slots over programs whose partial softmaxes a second kernel merges
exactly (for few query tokens: B * s_q small); the tuner picks it per (rows, context) bucket.
The TVM templates (llvm, cuda) follow the same contract; their knobs are the same ideas per target
(cpu_block_h / cpu_block_n / cpu_k_split, cuda_*), and they dequantize to fp32.

Workload (tuner, bench): S = B requests, SKV = context length per request, next_n = 2 query tokens
per request; each token selects k distinct random slots of its request's causal context (pages in
a random order), about 1 in 64 of them replaced by -1, -1 padded where the context is shorter
than k. check_args returns (rows = B * s_q, SKV = slots per request); check() samples requests.
"""
from __future__ import annotations

import math

import sympy as sp
import torch

from ..cache_formats import MLACacheFormat, dequantize_mla_rows
from ..verify import assert_close
from . import register
from .base import (SKV, WORKLOAD_NEXT_N, Call, Cost, Op, S, check_out, check_tensor, generator, mla_format, next_pow2,
                   softmax_scale, with_softmax_scale)


def _gather_rows(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """uint8 cache rows [n, bytes_per_token] of valid slots (no copy of the whole cache)."""
    page_size = cache.shape[1]
    return cache[slots // page_size, slots % page_size, 0]


def reference_sparse_decode(q, mla_cache, indices, sm_scale: float, fmt: MLACacheFormat):
    """Float64 from the math: per token, dequantize its valid selected rows exactly (fp8 * scale,
    rope as bf16) and take the softmax over them. Returns (out [B, s_q, H, latent], lse [B, s_q, H])."""
    B, s_q, heads, _ = q.shape
    n_slots = mla_cache.shape[0] * mla_cache.shape[1]
    out = torch.zeros(B, s_q, heads, fmt.latent_dim, dtype=torch.float64)
    lse = torch.full((B, s_q, heads), math.inf, dtype=torch.float64)
    for b in range(B):
        for t in range(s_q):
            idx = indices[b, t].long()
            idx = idx[(idx >= 0) & (idx < n_slots)]
            if idx.numel() == 0:
                continue
            rows = dequantize_mla_rows(_gather_rows(mla_cache, idx).cpu(), fmt)  # [n, latent + rope]
            scores = sm_scale * (q[b, t].cpu().double() @ rows.T)  # [H, n]
            lse[b, t] = torch.logsumexp(scores, dim=-1)
            out[b, t] = torch.softmax(scores, dim=-1) @ rows[:, :fmt.latent_dim]
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


def naive_sparse_decode(q, mla_cache, indices, sm_scale: float, fmt: MLACacheFormat, chunk: int = 64):
    """Gather the selected cache rows, dequantize them with torch, dense bf16 attention over them,
    in chunks of query tokens."""
    B, s_q, heads, dqk = q.shape
    qf, idx = q.reshape(B * s_q, heads, dqk), indices.reshape(B * s_q, -1)
    rows_u8 = mla_cache.reshape(-1, fmt.bytes_per_token)
    n_slots = rows_u8.shape[0]
    out = torch.empty(B * s_q, heads, fmt.latent_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * s_q, heads, dtype=torch.float32, device=q.device)
    for s0 in range(0, B * s_q, chunk):
        ix = idx[s0:s0 + chunk].long()
        valid = (ix >= 0) & (ix < n_slots)
        rows = dequantize_gathered(rows_u8[ix.clamp(0, n_slots - 1)], fmt)  # [c, k, D]
        scores = torch.einsum("chd,ckd->chk", qf[s0:s0 + chunk], rows).float() * sm_scale
        scores = scores.masked_fill(~valid[:, None, :], -math.inf)
        lse[s0:s0 + chunk] = torch.logsumexp(scores, -1)
        p = torch.softmax(scores, -1).nan_to_num(0.0).to(q.dtype)
        out[s0:s0 + chunk] = torch.einsum("chk,ckd->chd", p, rows[..., :fmt.latent_dim])
    return out.reshape(B, s_q, heads, -1), lse.reshape(B, s_q, heads)


def random_mla_cache(n_slots: int, page_size: int, fmt: MLACacheFormat, g: torch.Generator, device,
                     chunk: int = 1 << 20) -> torch.Tensor:
    """A filled cache [n_slots / page_size, page_size, 1, bytes_per_token]: fp8 codes of about 16 x
    N(0, 1), power-of-two scales 2^-5..2^-3 (values of about N(0, 1)), bf16 N(0, 1) rope; written
    in chunks of slots so no float copy of the whole cache exists."""
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


class SparseDecodeOp(Op):
    name = "sparse_decode"
    position = 70
    summary = ("sparse FP8 decode: out [B, s_q, H, v_dim] bf16 and natural-log lse [B, s_q, H] over the selected "
               "slots of the paged FP8 MLA cache")
    backends = ("triton", "tvm")
    needs_cache = True
    outputs = ("out", "lse")
    short_names = {"block_h": "bh", "block_n": "n", "k_split": "ks", "num_warps": "w", "num_stages": "s"}
    naive_name = "gather + torch dequantize + einsum + softmax (bf16, chunks of 64 tokens)"
    args = (("q", "Tensor"), ("mla_cache", "Tensor"), ("indices", "Tensor"), ("sm_scale", "float"))
    # The reference uses the exact dequantized rows (fp8 * scale); the kernel rounds fp32(code) * scale
    # to bf16 (exact for the format's power-of-two scales, 2**-9 relative otherwise), then rounds P
    # and the output to bf16 like the prefill attention, so the same bounds.
    tolerances = {"out": 1e-2, "lse": 1e-4}

    def semantic_fields(self, spec):
        at = spec.attention
        return {"heads": at.heads, "qk_dim": at.qk_dim, "v_dim": at.v_dim, "topk": spec.topk.k,
                "mla_format": spec.cache.mla_format}

    def template_fields(self, spec):
        fmt = mla_format(spec)
        return {"heads": spec.attention.heads, "mla_format": fmt.name, "latent_dim": fmt.latent_dim,
                "rope_dim": fmt.rope_dim, "group": fmt.group, "n_scales": fmt.n_scales,
                "scale_offset": fmt.scale_offset, "rope_offset": fmt.rope_offset,
                "bytes_per_token": fmt.bytes_per_token}

    def module_stem(self, spec):
        return f"sparse_decode_h{spec.attention.heads}_{spec.cache.mla_format}"

    def derived(self, spec, point, backend):
        fmt = mla_format(spec)
        return {"group_pad": next_pow2(fmt.group, 16), "rope_pad": next_pow2(fmt.rope_dim, 16),
                "latent_pad": next_pow2(fmt.latent_dim), "topk": spec.topk.k}

    def problem_symbols(self, spec):
        fmt = mla_format(spec)
        return {"heads": spec.attention.heads, "heads_pad": next_pow2(spec.attention.heads), "topk": spec.topk.k,
                "latent_dim": fmt.latent_dim, "rope_pad": next_pow2(fmt.rope_dim, 16),
                "bytes_per_token": fmt.bytes_per_token, "qk_dim": fmt.latent_dim + fmt.rope_dim,
                "n_scales": fmt.n_scales}

    def cost(self, spec):
        at, k, fmt = spec.attention, spec.topk.k, mla_format(spec)
        rows = S * WORKLOAD_NEXT_N  # query tokens
        flops = 2 * rows * at.heads * k * (at.qk_dim + at.v_dim)  # FlashMLA's count
        nbytes = (rows * at.heads * at.qk_dim * 2  # q
                  + sp.Min(S * SKV, rows * k) * fmt.bytes_per_token  # each cache row at most once
                  + rows * k * 4  # indices
                  + rows * at.heads * at.v_dim * 2 + rows * at.heads * 4)  # out, lse
        return Cost(self.name, flops, nbytes, "bf16")

    def check_args(self, spec, q, mla_cache, indices, sm_scale=None, out=None, lse=None):
        at, fmt = spec.attention, mla_format(spec)
        check_tensor("q", q, torch.bfloat16, (None, None, at.heads, at.qk_dim))
        dev, (B, s_q) = q.device, q.shape[:2]
        check_tensor("mla_cache", mla_cache, torch.uint8, (None, None, 1, fmt.bytes_per_token), dev)
        n_pages, page_size = mla_cache.shape[:2]
        if page_size < 1:
            raise ValueError(f"mla_cache has pages of {page_size} tokens: at least 1")
        # the fp32 scales and bf16 rope values are read in place: rows must start 4-byte aligned (the
        # storage offset is checked when the op runs: tracing cannot read it)
        offset = 0 if torch.compiler.is_compiling() else mla_cache.storage_offset()
        if any(x % 4 for x in (mla_cache.stride(0), mla_cache.stride(1), offset)):
            raise ValueError(f"mla_cache rows must start at multiples of 4 bytes (strides {mla_cache.stride()}, "
                             f"offset {offset}), so its fp32 scales can be read in place")
        if n_pages * page_size >= 2**31 - 1:
            raise ValueError(f"mla_cache has {n_pages * page_size} slots: int32 indices address at most 2**31 - 2")
        check_tensor("indices", indices, torch.int32, (B, s_q, spec.topk.k), dev)
        softmax_scale(spec, sm_scale)
        check_out("out", out, torch.bfloat16, (B, s_q, at.heads, at.v_dim), dev)
        check_out("lse", lse, torch.float32, (B, s_q, at.heads), dev)
        return Call(dev, B * s_q, max(1, n_pages * page_size // max(B, 1)))

    def launch_args(self, spec, args, kwargs):
        return with_softmax_scale(spec, args, kwargs)

    def fake(self, spec, q, mla_cache, indices, sm_scale):
        at = spec.attention
        B, s_q = q.shape[:2]
        return (q.new_empty((B, s_q, at.heads, at.v_dim)), q.new_empty((B, s_q, at.heads), dtype=torch.float32))

    def reference(self, spec, q, mla_cache, indices, sm_scale=None):
        scale = softmax_scale(spec, sm_scale)
        return reference_sparse_decode(q, mla_cache, indices, scale, mla_format(spec))

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


register(SparseDecodeOp())
