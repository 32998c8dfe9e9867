"""DeepGEMM's DSA indexer entry points (`deep_gemm.fp8_mqa_logits`, `get_paged_mqa_logits_metadata`,
`fp8_paged_mqa_logits`), run by dsagen's kernels for any head count and any next_n."""
from __future__ import annotations

import math

import torch

from ._builds import kernels_for


def _dims(q: torch.Tensor, what: str, rank: int) -> tuple[int, int]:
    if not isinstance(q, torch.Tensor) or q.dim() != rank:
        raise ValueError(f"{what} must be a {rank}-D tensor")
    if q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{what} must be torch.float8_e4m3fn, got {q.dtype}")
    return q.shape[-2], q.shape[-1]


def fp8_mqa_logits(q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
                   cu_seqlen_ks: torch.Tensor, cu_seqlen_ke: torch.Tensor, clean_logits: bool = True) -> torch.Tensor:
    """logits [M, N] fp32 = k_scale[n] * sum_h weights[m, h] * relu(q[m, h] . k[n]) on each row's
    window [ks[m], ke[m]). q [M, H, D] fp8, kv = (k [N, D] fp8, k_scale [N] fp32), weights [M, H]
    fp32 (q's scale folded in). Outside the window dsagen always writes -inf (DeepGEMM leaves it
    unspecified unless clean_logits), so clean_logits changes nothing here."""
    heads, dim = _dims(q, "q", 3)
    k, k_scale = kv
    return kernels_for(index_heads=heads, index_dim=dim).indexer(q, k, k_scale, weights, cu_seqlen_ks, cu_seqlen_ke)


def get_paged_mqa_logits_metadata(context_lens: torch.Tensor, block_size: int, num_sms: int) -> torch.Tensor:
    """DeepGEMM's schedule metadata. dsagen's kernels schedule themselves, so this is only the
    small int32 tensor callers keep and pass back (one entry per SM plus one, as DeepGEMM's)."""
    if not isinstance(num_sms, int) or num_sms < 1:
        raise ValueError(f"num_sms={num_sms!r} must be a positive integer")
    return torch.zeros(num_sms + 1, 2, dtype=torch.int32, device=context_lens.device)


def fp8_paged_mqa_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                         block_table: torch.Tensor, schedule_metadata: torch.Tensor, max_context_len: int,
                         clean_logits: bool = True) -> torch.Tensor:
    """logits [B * next_n, max_context_len] fp32 over each request's paged keys: query j of request b
    sees the tokens before context_lens[b] - next_n + j + 1, and -inf elsewhere. q [B, next_n, H, D]
    fp8; kv_cache uint8 [blocks, block_size, 1, D + 4] (a page's fp8 keys, then their fp32 scales);
    weights [B * next_n, H] fp32; block_table [B, max_blocks] int32. schedule_metadata is accepted
    and not needed."""
    heads, dim = _dims(q, "q", 4)
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 4:
        raise ValueError("kv_cache must be a uint8 tensor [blocks, block_size, 1, head_dim + 4]")
    if isinstance(max_context_len, bool) or not isinstance(max_context_len, int) or max_context_len < 0:
        raise ValueError(f"max_context_len={max_context_len!r} must be a non-negative integer")
    kernels = kernels_for(index_heads=heads, index_dim=dim, page_size=kv_cache.shape[1])
    logits = kernels.paged_indexer(q, kv_cache, weights, context_lens, block_table)
    width = logits.shape[1]
    if width == max_context_len:
        return logits
    out = torch.full((logits.shape[0], max_context_len), -math.inf, dtype=torch.float32, device=logits.device)
    keep = min(width, max_context_len)
    out[:, :keep] = logits[:, :keep]
    return out
