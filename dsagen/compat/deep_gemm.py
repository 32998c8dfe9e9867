"""DeepGEMM's DSA indexer entry points (`deep_gemm.fp8_mqa_logits`, `get_paged_mqa_logits_metadata`,
`fp8_paged_mqa_logits`), run by dsagen's kernels for any head count and any next_n."""
from __future__ import annotations

import math

import torch

from ..cache_formats import check_page_size
from ._args import Args
from ._builds import kernels_for_call

FP8 = torch.float8_e4m3fn


def fp8_mqa_logits(q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
                   cu_seqlen_ks: torch.Tensor, cu_seqlen_ke: torch.Tensor, clean_logits: bool = True) -> torch.Tensor:
    """logits [M, N] fp32 = k_scale[n] * sum_h weights[m, h] * relu(q[m, h] . k[n]) on each row's
    window [ks[m], ke[m]). q [M, H, D] fp8, kv = (k [N, D] fp8, k_scale [N] fp32), weights [M, H]
    fp32 (q's scale folded in). Outside the window dsagen always writes -inf (DeepGEMM leaves it
    unspecified unless clean_logits), so clean_logits changes nothing here."""
    args = Args("fp8_mqa_logits")
    args.tensor("q", q, FP8, "[M, H, D] fp8_e4m3fn", (None, None, None))
    (M, H, D), dev = q.shape, q.device
    if not isinstance(kv, (tuple, list)) or len(kv) != 2:
        raise args.fail(f"kv must be a (k, k_scale) tuple, got {type(kv).__name__}"
                        + (f" of {len(kv)}" if isinstance(kv, (tuple, list)) else ""), TypeError)
    k, k_scale = kv
    args.tensor("kv[0] (k)", k, FP8, "[N, D] fp8_e4m3fn, D = q.shape[2]", (None, D), dev)
    args.tensor("kv[1] (k_scale)", k_scale, torch.float32, "[N] fp32, N = k.shape[0]", (k.shape[0],), dev)
    args.tensor("weights", weights, torch.float32, "[M, H] fp32, M, H = q.shape[:2]", (M, H), dev)
    args.tensor("cu_seqlen_ks", cu_seqlen_ks, torch.int32, "[M] int32, M = q.shape[0]", (M,), dev)
    args.tensor("cu_seqlen_ke", cu_seqlen_ke, torch.int32, "[M] int32, M = q.shape[0]", (M,), dev)
    args.flag("clean_logits", clean_logits)
    args.at_least_one("H (q.shape[1])", H)
    args.no_grad_needed({"q": q, "kv[0] (k)": k, "kv[1] (k_scale)": k_scale, "weights": weights})
    kernels = kernels_for_call(args.fn, {"index_heads": "H (q.shape[1])", "index_dim": "D (q.shape[2])"},
                               index_heads=H, index_dim=D)
    return kernels.indexer(q, k, k_scale, weights, cu_seqlen_ks, cu_seqlen_ke)


def get_paged_mqa_logits_metadata(context_lens: torch.Tensor, block_size: int, num_sms: int) -> torch.Tensor:
    """DeepGEMM's schedule metadata. dsagen's kernels schedule themselves, so this is only the
    small int32 tensor callers keep and pass back (one entry per SM plus one, as DeepGEMM's)."""
    args = Args("get_paged_mqa_logits_metadata")
    args.tensor("context_lens", context_lens, torch.int32, "[B] int32", (None,), contiguous_last=False)
    block_size = args.integer("block_size", block_size, 1)
    if (problem := check_page_size(block_size)) is not None:
        raise args.fail(f"block_size={block_size} {problem} (the kv_cache's tokens per block)")
    num_sms = args.integer("num_sms", num_sms, 1)
    return torch.zeros(num_sms + 1, 2, dtype=torch.int32, device=context_lens.device)


def fp8_paged_mqa_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                         block_table: torch.Tensor, schedule_metadata: torch.Tensor, max_context_len: int,
                         clean_logits: bool = True) -> torch.Tensor:
    """logits [B * next_n, max_context_len] fp32 over each request's paged keys: query j of request b
    sees the tokens before context_lens[b] - next_n + j + 1, and -inf elsewhere. q [B, next_n, H, D]
    fp8; kv_cache uint8 [blocks, block_size, 1, D + 4] (a page's fp8 keys, then their fp32 scales);
    weights [B * next_n, H] fp32; block_table [B, max_blocks] int32. schedule_metadata is accepted
    and not needed. max_context_len: a Python or NumPy int or a 0-d integer tensor (read on the
    host, as DeepGEMM takes it)."""
    args = Args("fp8_paged_mqa_logits")
    args.tensor("q", q, FP8, "[B, next_n, H, D] fp8_e4m3fn", (None, None, None, None))
    (B, next_n, H, D), dev = q.shape, q.device
    args.tensor("kv_cache", kv_cache, torch.uint8, "[blocks, block_size, 1, D + 4] uint8, D = q.shape[3]",
                (None, None, 1, D + 4), dev)
    block_size = kv_cache.shape[1]
    if kv_cache.numel() and block_size > 1 and kv_cache.stride(1) != D + 4:
        raise args.fail(f"kv_cache must be packed within each block (stride {D + 4} along dim 1), "
                        f"got strides {kv_cache.stride()}")
    args.tensor("weights", weights, torch.float32, "[B * next_n, H] fp32", (B * next_n, H), dev)
    args.tensor("context_lens", context_lens, torch.int32, "[B] int32, B = q.shape[0]", (B,), dev)
    args.tensor("block_table", block_table, torch.int32, "[B, max_blocks] int32, B = q.shape[0]", (B, None), dev)
    args.tensor("schedule_metadata", schedule_metadata, torch.int32,
                "[num_sms + 1, 2] int32, from get_paged_mqa_logits_metadata", (None, 2), dev, contiguous_last=False)
    max_context_len = args.integer("max_context_len", max_context_len, 0)
    args.flag("clean_logits", clean_logits)
    args.at_least_one("next_n (q.shape[1])", next_n)
    args.at_least_one("H (q.shape[2])", H)
    args.no_grad_needed({"q": q, "weights": weights})
    said = {"index_heads": "H (q.shape[2])", "index_dim": "D (q.shape[3])",
            "page_size": "block_size (kv_cache.shape[1])"}
    kernels = kernels_for_call(args.fn, said, index_heads=H, index_dim=D, page_size=block_size)
    logits = kernels.paged_indexer(q, kv_cache, weights, context_lens, block_table)
    width = logits.shape[1]
    if width == max_context_len:
        return logits
    out = torch.full((logits.shape[0], max_context_len), -math.inf, dtype=torch.float32, device=logits.device)
    keep = min(width, max_context_len)
    out[:, :keep] = logits[:, :keep]
    return out
