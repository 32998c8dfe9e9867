"""Decode, sparse MLA attention over the paged FP8 MLA cache (FlashMLA's sparse FP8 decode, for any
head count and any k).

q [B, s_q, H, qk_dim] bf16 (s_q = next_n new tokens per request), mla_cache uint8
[n_pages, page_size, 1, bytes_per_token] in the spec's cache format (dsagen/cache_formats.py),
indices [B, s_q, k] int32 slots into the cache's token axis (slot = page * page_size + offset: the
page table is already applied; invalid = negative or >= n_pages * page_size). out [B, s_q, H,
v_dim] bf16 and lse [B, s_q, H] fp32 (natural log): out[b,t,h] = sum_i softmax_i(sm_scale *
q[b,t,h] . row_i) * V_i over the valid selected rows, row_i the dequantized row; a token with no
valid index gives out 0 and lse +inf; NaN as the prefill sparse attention (docs/numerics.md).

Two kinds of format: V3.2's rows (fp8 latent | fp32 scales, one per group | bf16 rope; V = the
latent values) and DeepSeek-V4's MODEL1 blocks (per block, the page's data rows [fp8 latent | bf16
rope], then its scale rows of ue8m0 bytes, the block padded; V = the whole row, so qk_dim = v_dim).
The page size is read from the tensor (any size; the spec's cache.page_size need not match) and
the block stride from its stride(0), so padded page strides work too.

Optional inputs (each a kernel specialization chosen only when given, no host sync): attn_sink [H]
fp32 (out *= 1 / (1 + exp(sink[h] - lse)), lse unchanged; after the split-k combine), topk_length
[B] int32 (request b's tokens read their first topk_length[b] indices: <= 0 none, > k all), and
the window cache: extra_cache (the same format, its own page size and blocks), extra_indices [B,
s_q, k2] (any k2 >= 1) and extra_topk_length [B], attended after the main selection in the same
online softmax (one lse over both). The TVM templates take them all on llvm (an absent one as its
neutral value); their CUDA kernel reads V3.2's rows, without them.

Schedule: block_h heads x block_n gathered rows per step; k_split > 1 splits each token's k slots
over programs whose partial softmaxes a second kernel merges exactly (for few query tokens: B * s_q
small); the tuner picks it per (rows, context) bucket. The TVM templates (llvm, cuda) follow the
same contract; their knobs are the same ideas per target (cpu_block_h / cpu_block_n / cpu_k_split,
cuda_*), and they dequantize to fp32.

Workload (tuner, bench): S = B requests, SKV = context length per request, next_n = 2 query tokens
per request; each token selects k distinct random slots of its request's causal context (pages in
a random order), about 1 in 64 of them replaced by -1, -1 padded where the context is shorter
than k. check_args returns (rows = B * s_q, SKV = slots per request); check() samples requests.
"""
from __future__ import annotations

import sympy as sp
import torch

from ..cache_formats import MLABlockFormat
from ..plan import SKV, Cost, S, next_pow2
from .base import DECODE_TUNING, Call, Op
from .checks import check_out, check_tensor, softmax_scale
from .shared import SM_SCALE, WORKLOAD_NEXT_N, mla_format
from .signature import Arg, Signature, tensor

# the optional inputs, after sm_scale (each specializes the kernel only when given)
OPTIONAL_INPUTS = ("attn_sink", "topk_length", "extra_cache", "extra_indices", "extra_topk_length")


class SparseDecodeOp(Op):
    name = "sparse_decode"
    position = 70
    summary = ("sparse FP8 decode: out [B, s_q, H, v_dim] bf16 and natural-log lse [B, s_q, H] over the selected "
               "slots of the paged FP8 MLA cache")
    backends = ("triton", "tvm")
    doc = ("(out [B, s_q, H, v_dim] bf16, lse [B, s_q, H] fp32) over the selected cache slots\n"
           "[B, s_q, k] (negative or out-of-range: invalid) of the paged FP8 MLA cache; optional attn_sink [H]\n"
           "fp32, topk_length [B] int32, and a second cache (extra_cache, extra_indices [B, s_q, k2],\n"
           "extra_topk_length [B]) attended in the same softmax.")
    needs_cache = True
    short_names = {"block_h": "bh", "block_n": "n", "k_split": "ks", "num_warps": "w", "num_stages": "s"}
    signature = Signature((tensor("q"), tensor("mla_cache"), tensor("indices"), SM_SCALE,
                           *(Arg(name, "Tensor?", default=None) for name in OPTIONAL_INPUTS)),
                          returns=("out", "lse"))
    tuning = DECODE_TUNING

    def semantic_fields(self, spec):
        at = spec.attention
        return {"heads": at.heads, "qk_dim": at.qk_dim, "v_dim": at.v_dim, "topk": spec.topk.k,
                "mla_format": spec.cache.mla_format}

    def template_fields(self, spec):
        fmt = mla_format(spec)
        return {"heads": spec.attention.heads, "mla_format": fmt.name, **format_fields(fmt)}

    def module_stem(self, spec):
        return f"sparse_decode_h{spec.attention.heads}_{spec.cache.mla_format}"

    def derived(self, spec, point, backend):
        fmt = mla_format(spec)
        return {"group_pad": next_pow2(fmt.group, 16), "rope_pad": next_pow2(fmt.rope_dim, 16),
                "latent_pad": next_pow2(fmt.latent_dim), "v_pad": next_pow2(fmt.v_dim), "topk": spec.topk.k}

    def problem_symbols(self, spec):
        fmt = mla_format(spec)
        return {"heads": spec.attention.heads, "heads_pad": next_pow2(spec.attention.heads), "topk": spec.topk.k,
                "latent_dim": fmt.latent_dim, "rope_pad": next_pow2(fmt.rope_dim, 16),
                "bytes_per_token": fmt.bytes_per_token, "qk_dim": fmt.qk_dim,
                "v_dim": fmt.v_dim, "n_scales": fmt.n_scales}

    def cost(self, spec):
        at, k, fmt = spec.attention, spec.topk.k, mla_format(spec)
        rows = S * WORKLOAD_NEXT_N  # query tokens
        flops = 2 * rows * at.heads * k * (at.qk_dim + at.v_dim)  # FlashMLA's count
        nbytes = (rows * at.heads * at.qk_dim * 2  # q
                  + sp.Min(S * SKV, rows * k) * fmt.bytes_per_token  # each cache row at most once
                  + rows * k * 4  # indices
                  + rows * at.heads * at.v_dim * 2 + rows * at.heads * 4)  # out, lse
        return Cost(self.name, flops, nbytes, "bf16")

    def check_args(self, spec, q, mla_cache, indices, sm_scale=None, attn_sink=None, topk_length=None,
                   extra_cache=None, extra_indices=None, extra_topk_length=None, out=None, lse=None):
        at, fmt = spec.attention, mla_format(spec)
        check_tensor("q", q, torch.bfloat16, (None, None, at.heads, at.qk_dim))
        dev, (B, s_q) = q.device, q.shape[:2]
        n_slots = check_cache("mla_cache", mla_cache, fmt, dev)
        check_tensor("indices", indices, torch.int32, (B, s_q, spec.topk.k), dev)
        softmax_scale(spec, sm_scale)
        if attn_sink is not None:
            check_tensor("attn_sink", attn_sink, torch.float32, (at.heads,), dev)
        check_lengths("topk_length", topk_length, B, dev)
        if (extra_cache is None) != (extra_indices is None):
            raise ValueError("extra_cache and extra_indices go together: pass both (the second cache and its slots) "
                             "or neither")
        if extra_cache is not None:
            check_cache("extra_cache", extra_cache, fmt, dev)
            check_tensor("extra_indices", extra_indices, torch.int32, (B, s_q, None), dev)
            if extra_indices.shape[2] < 1:
                raise ValueError(f"extra_indices must have shape [{B}, {s_q}, k2] with k2 >= 1, "
                                 f"got {list(extra_indices.shape)}")
        elif extra_topk_length is not None:
            raise ValueError("extra_topk_length needs extra_cache and extra_indices (it cuts extra_indices)")
        check_lengths("extra_topk_length", extra_topk_length, B, dev)
        check_out("out", out, torch.bfloat16, (B, s_q, at.heads, at.v_dim), dev)
        check_out("lse", lse, torch.float32, (B, s_q, at.heads), dev)
        return Call(dev, B * s_q, max(1, n_slots // max(B, 1)))

    def fake(self, spec, q, mla_cache, indices, sm_scale, attn_sink=None, topk_length=None, extra_cache=None,
             extra_indices=None, extra_topk_length=None):
        at = spec.attention
        B, s_q = q.shape[:2]
        return (q.new_empty((B, s_q, at.heads, at.v_dim)), q.new_empty((B, s_q, at.heads), dtype=torch.float32))


def format_fields(fmt) -> dict:
    """The cache layout numbers the templates read. A row format: one row of bytes_per_token per
    token, fp32 scales at scale_offset, rope at rope_offset. A block format: data rows of
    data_row_bytes (rope at rope_offset within them), after the page's data rows its scale rows of
    scale_row_bytes (one ue8m0 byte per group at scale_offset within them)."""
    block = isinstance(fmt, MLABlockFormat)
    return {"block_format": int(block), "latent_dim": fmt.latent_dim, "rope_dim": fmt.rope_dim, "group": fmt.group,
            "n_scales": fmt.n_scales, "v_dim": fmt.v_dim,
            "scale_offset": 0 if block else fmt.scale_offset,
            "rope_offset": fmt.latent_dim if block else fmt.rope_offset,
            "bytes_per_token": fmt.bytes_per_token,
            "data_row_bytes": fmt.data_row_bytes if block else fmt.bytes_per_token,
            "scale_row_bytes": fmt.scale_row_bytes if block else 0}


def check_cache(name: str, cache, fmt, dev) -> int:
    """Check an MLA cache tensor of `fmt` (ValueError naming `name`); return its number of slots.
    A row format's fp32 scales are read in place: its rows start at 4-byte multiples. A block
    format's view [blocks, page, 1, bytes_per_token] packs each block (stride(1) = bytes_per_token),
    its stride(0) the padded block size, even (bf16 rope values are read in place)."""
    check_tensor(name, cache, torch.uint8, (None, None, 1, fmt.bytes_per_token), dev)
    n_pages, page_size = cache.shape[:2]
    if page_size < 1:
        raise ValueError(f"{name} has pages of {page_size} tokens: at least 1")
    # the storage offset is checked when the op runs: tracing cannot read it
    offset = 0 if torch.compiler.is_compiling() else cache.storage_offset()
    if isinstance(fmt, MLABlockFormat):
        if (page_size > 1 and cache.stride(1) != fmt.bytes_per_token) or \
                (n_pages > 1 and cache.stride(0) < page_size * fmt.bytes_per_token) or (cache.stride(0) | offset) % 2:
            raise ValueError(f"{name} must pack each block's {page_size} x {fmt.bytes_per_token} bytes (strides "
                             f"[even >= {page_size * fmt.bytes_per_token}, {fmt.bytes_per_token}, *, 1], an even "
                             f"offset), got strides {list(cache.stride())}, offset {offset}")
    elif any(x % 4 for x in (cache.stride(0), cache.stride(1), offset)):
        raise ValueError(f"{name} rows must start at multiples of 4 bytes (strides {cache.stride()}, "
                         f"offset {offset}), so its fp32 scales can be read in place")
    if n_pages * page_size >= 2**31 - 1:
        raise ValueError(f"{name} has {n_pages * page_size} slots: int32 indices address at most 2**31 - 2")
    return n_pages * page_size


def check_lengths(name: str, lengths, B: int, dev) -> None:
    """An optional per-request length: None or int32 [B]."""
    if lengths is not None:
        check_tensor(name, lengths, torch.int32, (B,), dev)


SPARSE_DECODE = SparseDecodeOp()
