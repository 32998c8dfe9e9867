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

import sympy as sp
import torch

from ..plan import SKV, Cost, S, next_pow2
from .base import DECODE_TUNING, Call, Op
from .checks import check_out, check_tensor, softmax_scale
from .shared import SM_SCALE, WORKLOAD_NEXT_N, mla_format
from .signature import Signature, tensor


class SparseDecodeOp(Op):
    name = "sparse_decode"
    position = 70
    summary = ("sparse FP8 decode: out [B, s_q, H, v_dim] bf16 and natural-log lse [B, s_q, H] over the selected "
               "slots of the paged FP8 MLA cache")
    backends = ("triton", "tvm")
    doc = ("(out [B, s_q, H, v_dim] bf16, lse [B, s_q, H] fp32) over the selected cache slots\n"
           "[B, s_q, k] (negative or out-of-range: invalid) of the paged FP8 MLA cache.")
    needs_cache = True
    short_names = {"block_h": "bh", "block_n": "n", "k_split": "ks", "num_warps": "w", "num_stages": "s"}
    signature = Signature((tensor("q"), tensor("mla_cache"), tensor("indices"), SM_SCALE), returns=("out", "lse"))
    tuning = DECODE_TUNING

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

    def fake(self, spec, q, mla_cache, indices, sm_scale):
        at = spec.attention
        B, s_q = q.shape[:2]
        return (q.new_empty((B, s_q, at.heads, at.v_dim)), q.new_empty((B, s_q, at.heads), dtype=torch.float32))


SPARSE_DECODE = SparseDecodeOp()
