"""DeepGEMM's DSA indexer entry points, run by dsagen's kernels for any head count and any next_n:
`fp8_fp4_mqa_logits` and `fp8_fp4_paged_mqa_logits` (fp32 or bf16 logits, compressed prefill
logits, per-token context lengths), their older names `fp8_mqa_logits` and `fp8_paged_mqa_logits`,
`get_paged_mqa_logits_metadata`, and the process-wide `get_num_sms` / `set_num_sms`.

dsagen serves fp8 e4m3 inputs (on Hopper and the CPU); DeepGEMM's FP4 inputs are refused."""
from __future__ import annotations

import math
import os
from typing import Any

import torch

from ..cache_formats import check_page_size
from ._args import Args, describe
from ._builds import kernels_for_call

FP8 = torch.float8_e4m3fn
LOGITS_DTYPES = (torch.float32, torch.bfloat16)
PACKED_FP4 = (torch.int8, getattr(torch, "float4_e2m1fn_x2", torch.int8))  # DeepGEMM packs FP4 pairs in int8
FP4_REFUSED = ("FP4 inputs are not supported: dsagen's indexers take fp8 e4m3 q and keys with fp32 key scales "
               "(on Hopper and the CPU)")

_num_sms = 0  # set_num_sms's value; 0: the device's count


# -- the process-wide SM count -------------------------------------------------------------------

def _device_num_sms() -> int:
    """The current CUDA device's multiprocessor count, or the CPU's core count without CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return os.cpu_count() or 1


def get_num_sms() -> int:
    """The SM count set by set_num_sms, else the current device's (the CPU's cores without CUDA).
    dsagen's kernels size their own grids, so the number only sizes get_paged_mqa_logits_metadata's
    tensor when a caller passes it there, as DeepGEMM's callers do."""
    return _num_sms or _device_num_sms()


def set_num_sms(num_sms: int) -> None:
    """Set the process-wide SM count get_num_sms returns: 1 up to the device's count, or 0 for the
    device's count again (as DeepGEMM). It changes no launch: dsagen's kernels schedule themselves."""
    global _num_sms
    args = Args("set_num_sms")
    number = args.integer("num_sms", num_sms, 0)
    most = _device_num_sms()
    if number > most:
        raise args.fail(f"num_sms must be from 0 (the device's count) to {most} (the device's count), got {number}")
    _num_sms = number


# -- argument checks shared by the old and the current names -------------------------------------

def _logits_dtype(args: Args, value: Any) -> torch.dtype:
    if not isinstance(value, torch.dtype):
        raise args.fail(f"logits_dtype must be torch.float32 or torch.bfloat16, got {describe(value)}", TypeError)
    if value not in LOGITS_DTYPES:
        raise args.fail(f"logits_dtype must be torch.float32 or torch.bfloat16, got {value}")
    return value


def _fp8_pair(args: Args, name: str, pair: Any, what: str) -> tuple[Any, Any]:
    """The two tensors of a (values, scales) argument, as a tuple or list of two."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise args.fail(f"{name} must be a {what} tuple, got {type(pair).__name__}"
                        + (f" of {len(pair)}" if isinstance(pair, (tuple, list)) else ""), TypeError)
    return pair[0], pair[1]


def _refuse_fp4(args: Args, name: str, t: Any, fp4_dtypes: tuple) -> None:
    """A tensor in one of DeepGEMM's FP4 dtypes (packed values, int32 ue8m0 scales) is refused by name."""
    if isinstance(t, torch.Tensor) and t.dtype in fp4_dtypes:
        raise args.fail(f"{name} is {t.dtype}, DeepGEMM's FP4 layout: {FP4_REFUSED}")


def _q_of_pair(args: Args, q: Any) -> Any:
    """q_fp8 of the current API's (q_fp8, None); a q_sf (FP4's scales) is refused."""
    q_fp, q_sf = _fp8_pair(args, "q", q, "(q_fp8, None)")
    if q_sf is not None:
        raise args.fail(f"q[1] (q_sf) must be None, got {describe(q_sf)}: {FP4_REFUSED}")
    _refuse_fp4(args, "q[0]", q_fp, PACKED_FP4)
    return q_fp


def _weights(args: Args, weights: Any, layout: str, shape: tuple, dev, logits_dtype: torch.dtype) -> torch.Tensor:
    """weights as fp32: fp32, or bf16 where the logits are bf16 (DeepGEMM's rule; the cast is exact)."""
    bf16_ok = logits_dtype == torch.bfloat16 and isinstance(weights, torch.Tensor) and weights.dtype == torch.bfloat16
    dtype = torch.bfloat16 if bf16_ok else torch.float32
    args.tensor("weights", weights, dtype, layout, shape, dev)
    return weights.float() if bf16_ok else weights


def _context_lens(args: Args, context_lens: Any, B: int, next_n: int, dev) -> torch.Tensor:
    """[B] (request b's length; query j sees s < len - next_n + j + 1) or [B, next_n] (one per query)."""
    if isinstance(context_lens, torch.Tensor) and context_lens.dim() == 2:
        return args.tensor("context_lens", context_lens, torch.int32, "[B, next_n] int32, B, next_n = q.shape[:2]",
                           (B, next_n), dev)
    return args.tensor("context_lens", context_lens, torch.int32,
                       "[B] or [B, next_n] int32, B = q.shape[0]", (B,), dev)


def _indices(args: Args, indices: Any, B: int, dev) -> None:
    """DeepGEMM's varlen hint (the request of each row): checked, not read."""
    if indices is not None:
        if not isinstance(indices, torch.Tensor):
            raise args.fail(f"indices must be None or a torch.Tensor [B] int32, got {type(indices).__name__}",
                            TypeError)
        args.tensor("indices", indices, torch.int32, "[B] int32, B = q.shape[0]", (B,), dev)


# -- prefill: logits over each row's key window --------------------------------------------------

def compress_logits(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, width: int) -> torch.Tensor:
    """DeepGEMM's compressed logits [M, width]: column j of row m holds key ks[m] + j for
    j < ke[m] - ks[m] (keys outside [0, N) and columns past the window: -inf)."""
    n_keys = logits.shape[1]
    if n_keys == 0:
        return torch.full((logits.shape[0], width), -math.inf, dtype=logits.dtype, device=logits.device)
    keys = ks.long()[:, None] + torch.arange(width, device=logits.device)[None, :]
    inside = (keys < ke.long()[:, None]) & (keys >= 0) & (keys < n_keys)
    return logits.gather(1, keys.clamp(0, n_keys - 1)).masked_fill(~inside, -math.inf)


def _mqa_logits(args: Args, q_name: str, q: Any, kv: Any, weights: Any, ks: Any, ke: Any, names: tuple[str, str],
                clean_logits: Any, max_seqlen_k: Any, logits_dtype: torch.dtype) -> torch.Tensor:
    """Both prefill names: the checks in the caller's words (q_name, names: how the call calls q and
    the window bounds), the kernel, then the compressed layout and the dtype asked for."""
    args.tensor(q_name, q, FP8, "[M, H, D] fp8_e4m3fn", (None, None, None))
    (M, H, D), dev = q.shape, q.device
    k, k_scale = _fp8_pair(args, "kv", kv, "(k, k_scale)")
    _refuse_fp4(args, "kv[0] (k)", k, PACKED_FP4)
    _refuse_fp4(args, "kv[1] (k_scale)", k_scale, (torch.int32,))
    args.tensor("kv[0] (k)", k, FP8, "[N, D] fp8_e4m3fn, D = q.shape[2]", (None, D), dev)
    args.tensor("kv[1] (k_scale)", k_scale, torch.float32, "[N] fp32, N = k.shape[0]", (k.shape[0],), dev)
    weights = _weights(args, weights, "[M, H] fp32, M, H = q.shape[:2]", (M, H), dev, logits_dtype)
    args.tensor(names[0], ks, torch.int32, "[M] int32, M = q.shape[0]", (M,), dev)
    args.tensor(names[1], ke, torch.int32, "[M] int32, M = q.shape[0]", (M,), dev)
    args.flag("clean_logits", clean_logits)
    width = args.integer("max_seqlen_k", max_seqlen_k, 0)
    args.at_least_one("H (q.shape[1])", H)
    args.no_grad_needed({q_name: q, "kv[0] (k)": k, "kv[1] (k_scale)": k_scale, "weights": weights})
    kernels = kernels_for_call(args.fn, {"index_heads": "H (q.shape[1])", "index_dim": "D (q.shape[2])"},
                               index_heads=H, index_dim=D)
    logits = kernels.indexer(q, k, k_scale, weights, ks, ke)
    if width:
        logits = compress_logits(logits, ks, ke, width)
    return logits.to(logits_dtype)


def fp8_fp4_mqa_logits(q: tuple, kv: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
                       cu_seq_len_k_start: torch.Tensor, cu_seq_len_k_end: torch.Tensor, clean_logits: bool = True,
                       max_seqlen_k: int = 0, logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """logits [M, N] = k_scale[n] * sum_h weights[m, h] * relu(q[m, h] . k[n]) on each row's window
    [start[m], end[m]), -inf outside, in logits_dtype (fp32 or bf16: the fp32 logits rounded).
    q = (q_fp8 [M, H, D], None); kv = (k [N, D] fp8, k_scale [N] fp32); weights [M, H] fp32 (bf16
    where logits_dtype is bf16). max_seqlen_k > 0 gives DeepGEMM's compressed logits [M, max_seqlen_k]:
    column j of row m holds key start[m] + j for j < end[m] - start[m], -inf elsewhere (dsagen
    computes the [M, N] logits and gathers them). dsagen always writes -inf outside the windows, so
    clean_logits changes nothing (and is accepted with max_seqlen_k, which DeepGEMM refuses)."""
    args = Args("fp8_fp4_mqa_logits")
    logits_dtype = _logits_dtype(args, logits_dtype)
    return _mqa_logits(args, "q[0]", _q_of_pair(args, q), kv, weights, cu_seq_len_k_start, cu_seq_len_k_end,
                       ("cu_seq_len_k_start", "cu_seq_len_k_end"), clean_logits, max_seqlen_k, logits_dtype)


def fp8_mqa_logits(q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
                   cu_seqlen_ks: torch.Tensor, cu_seqlen_ke: torch.Tensor, clean_logits: bool = True,
                   max_seqlen_k: int = 0) -> torch.Tensor:
    """The older name: fp8_fp4_mqa_logits((q, None), ...) with fp32 logits. q [M, H, D] fp8,
    kv = (k [N, D] fp8, k_scale [N] fp32), weights [M, H] fp32 (q's scale folded in); logits [M, N]
    fp32, or [M, max_seqlen_k] compressed where max_seqlen_k > 0."""
    args = Args("fp8_mqa_logits")
    return _mqa_logits(args, "q", q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, ("cu_seqlen_ks", "cu_seqlen_ke"),
                       clean_logits, max_seqlen_k, torch.float32)


# -- decode: logits over the paged key cache ------------------------------------------------------

def get_paged_mqa_logits_metadata(context_lens: torch.Tensor, block_size: int | None = None,
                                  num_sms: int | None = None, indices: torch.Tensor | None = None, *,
                                  block_kv: int | None = None) -> torch.Tensor:
    """DeepGEMM's schedule metadata. dsagen's kernels schedule themselves, so this is only the
    small int32 tensor callers keep and pass back (num_sms + 1 rows of 2, as DeepGEMM's).
    context_lens [B] or [B, next_n] int32; block_size (DeepGEMM's keyword: block_kv) the cache's
    tokens per block; indices (varlen rows' requests) is checked, not needed."""
    args = Args("get_paged_mqa_logits_metadata")
    shape = (None, None) if isinstance(context_lens, torch.Tensor) and context_lens.dim() == 2 else (None,)
    args.tensor("context_lens", context_lens, torch.int32, "[B] or [B, next_n] int32", shape, contiguous_last=False)
    if block_kv is not None and block_size is not None:
        raise args.fail("pass block_size or block_kv (the same number), not both", TypeError)
    block_name = "block_kv" if block_kv is not None else "block_size"
    if block_kv is None and block_size is None:
        raise args.fail("missing block_size (the kv_cache's tokens per block)", TypeError)
    if num_sms is None:
        raise args.fail("missing num_sms (get_num_sms() as DeepGEMM's callers pass)", TypeError)
    block = args.integer(block_name, block_kv if block_kv is not None else block_size, 1)
    if (problem := check_page_size(block)) is not None:
        raise args.fail(f"{block_name}={block} {problem} (the kv_cache's tokens per block)")
    num_sms = args.integer("num_sms", num_sms, 1)
    if indices is not None:
        _indices(args, indices, context_lens.shape[0], context_lens.device)
    return torch.zeros(num_sms + 1, 2, dtype=torch.int32, device=context_lens.device)


def _paged_logits(args: Args, q_name: str, q: Any, kv_cache: Any, weights: Any, context_lens: Any,
                  block_table: Any, schedule_meta: Any, meta_name: str, max_context_len: Any, clean_logits: Any,
                  indices: Any, logits_dtype: torch.dtype) -> torch.Tensor:
    """Both decode names: the checks in the caller's words, the kernel (it takes [B] and per-token
    [B, next_n] lengths alike), the width max_context_len and the dtype asked for."""
    args.tensor(q_name, q, FP8, "[B, next_n, H, D] fp8_e4m3fn", (None, None, None, None))
    (B, next_n, H, D), dev = q.shape, q.device
    args.tensor("kv_cache", kv_cache, torch.uint8, "[blocks, block_size, 1, D + 4] uint8, D = q.shape[3]",
                (None, None, 1, D + 4), dev)
    block_size = kv_cache.shape[1]
    if kv_cache.numel() and block_size > 1 and kv_cache.stride(1) != D + 4:
        raise args.fail(f"kv_cache must be packed within each block (stride {D + 4} along dim 1), "
                        f"got strides {kv_cache.stride()}")
    weights = _weights(args, weights, "[B * next_n, H] fp32", (B * next_n, H), dev, logits_dtype)
    context_lens = _context_lens(args, context_lens, B, next_n, dev)
    args.tensor("block_table", block_table, torch.int32, "[B, max_blocks] int32, B = q.shape[0]", (B, None), dev)
    args.tensor(meta_name, schedule_meta, torch.int32,
                "[num_sms + 1, 2] int32, from get_paged_mqa_logits_metadata", (None, 2), dev, contiguous_last=False)
    max_context_len = args.integer("max_context_len", max_context_len, 0)
    args.flag("clean_logits", clean_logits)
    _indices(args, indices, B, dev)
    args.at_least_one("next_n (q.shape[1])", next_n)
    args.at_least_one("H (q.shape[2])", H)
    args.no_grad_needed({q_name: q, "weights": weights})
    said = {"index_heads": "H (q.shape[2])", "index_dim": "D (q.shape[3])",
            "page_size": "block_size (kv_cache.shape[1])"}
    kernels = kernels_for_call(args.fn, said, index_heads=H, index_dim=D, page_size=block_size)
    logits = kernels.paged_indexer(q, kv_cache, weights, context_lens, block_table)
    return _to_width(logits, max_context_len).to(logits_dtype)


def _to_width(logits: torch.Tensor, width: int) -> torch.Tensor:
    """The logits cropped, or padded with -inf, to `width` columns (max_context_len)."""
    if logits.shape[1] == width:
        return logits
    out = torch.full((logits.shape[0], width), -math.inf, dtype=logits.dtype, device=logits.device)
    keep = min(logits.shape[1], width)
    out[:, :keep] = logits[:, :keep]
    return out


def fp8_fp4_paged_mqa_logits(q: tuple, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                             block_table: torch.Tensor, schedule_meta: torch.Tensor, max_context_len: int,
                             clean_logits: bool = False, logits_dtype: torch.dtype = torch.float32,
                             indices: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B * next_n, max_context_len] in logits_dtype (fp32, or bf16: the fp32 logits rounded)
    over each request's paged keys. q = (q_fp8 [B, next_n, H, D], None); kv_cache uint8 [blocks,
    block_size, 1, D + 4] (a block's fp8 keys, then their fp32 scales); weights [B * next_n, H] fp32
    (bf16 where logits_dtype is bf16); block_table [B, max_blocks] int32. context_lens [B, next_n]
    int32: query j of request b sees the tokens s < context_lens[b, j]; or [B]: it sees s <
    context_lens[b] - next_n + j + 1. -inf elsewhere (dsagen always writes it: clean_logits changes
    nothing). schedule_meta and indices (DeepGEMM's varlen hint) are checked, not needed.
    max_context_len: a Python or NumPy int or a 0-d integer tensor (read on the host)."""
    args = Args("fp8_fp4_paged_mqa_logits")
    logits_dtype = _logits_dtype(args, logits_dtype)
    return _paged_logits(args, "q[0]", _q_of_pair(args, q), kv_cache, weights, context_lens, block_table,
                         schedule_meta, "schedule_meta", max_context_len, clean_logits, indices, logits_dtype)


def fp8_paged_mqa_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                         block_table: torch.Tensor, schedule_metadata: torch.Tensor, max_context_len: int,
                         clean_logits: bool = True, indices: torch.Tensor | None = None) -> torch.Tensor:
    """The older name: fp8_fp4_paged_mqa_logits((q, None), ...) with fp32 logits [B * next_n,
    max_context_len]. q [B, next_n, H, D] fp8; kv_cache uint8 [blocks, block_size, 1, D + 4];
    weights [B * next_n, H] fp32; context_lens [B] (query j of request b sees s < context_lens[b] -
    next_n + j + 1) or [B, next_n] (query j sees s < context_lens[b, j]) int32; block_table
    [B, max_blocks] int32; schedule_metadata and indices are checked, not needed."""
    args = Args("fp8_paged_mqa_logits")
    return _paged_logits(args, "q", q, kv_cache, weights, context_lens, block_table, schedule_metadata,
                         "schedule_metadata", max_context_len, clean_logits, indices, torch.float32)
