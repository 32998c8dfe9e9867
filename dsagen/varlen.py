"""Batches of sequences of different lengths (varlen) as the per-row key windows dsagen's kernels take.

A batch is flattened the usual way: sequence b's queries are rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]
of q, and its keys are rows cu_seqlens_k[b] .. cu_seqlens_k[b+1] of kv. Each query row then sees a
window [ks, ke) of kv rows inside its own sequence, and the top-k indices the kernels return are
rows of the flattened kv, ready for sparse attention.
"""
from __future__ import annotations

import torch


def _check_cu(name: str, cu) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor of batch + 1 offsets, starting at 0")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {cu.dtype}")


def windows_from_cu_seqlens(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None = None,
                            causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(ks, ke), int32 [total queries], for a varlen batch.

    cu_seqlens_q: [batch + 1] offsets of each sequence's queries (0, len_0, len_0 + len_1, ...).
    cu_seqlens_k: the same for the keys; None means the keys are the queries (self-attention
    prefill, cu_seqlens_k = cu_seqlens_q).
    causal: query i of a sequence with Lq queries and Lk keys is the token at position
    Lk - Lq + i (the queries are the last Lq tokens, as when a prefix is cached), and sees the keys
    up to and including itself: [start_k, start_k + Lk - Lq + i + 1). Not causal: all Lk keys.

    The result lives on cu_seqlens_q's device; the number of query rows is read from its last
    offset (one host sync).
    """
    _check_cu("cu_seqlens_q", cu_seqlens_q)
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    _check_cu("cu_seqlens_k", cu_k)
    if cu_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k has {cu_k.numel()} offsets but cu_seqlens_q has {cu_seqlens_q.numel()}: "
                         "both describe the same batch")
    cu_q = cu_seqlens_q.long()
    cu_k = cu_k.long().to(cu_q.device)
    len_q = cu_q[1:] - cu_q[:-1]
    len_k = cu_k[1:] - cu_k[:-1]
    if bool((cu_q[0] != 0) | (cu_k[0] != 0)) or bool((len_q < 0).any() | (len_k < 0).any()):
        raise ValueError("cu_seqlens must start at 0 and never decrease")
    if causal and bool((len_q > len_k).any()):
        raise ValueError("causal windows need at least as many keys as queries in every sequence "
                         "(the queries are the last tokens of their sequence)")
    total = int(cu_q[-1])
    seq = torch.repeat_interleave(torch.arange(len_q.numel(), device=cu_q.device), len_q, output_size=total)
    ks = cu_k[:-1][seq]
    if causal:
        pos = torch.arange(total, device=cu_q.device) - cu_q[:-1][seq]  # the query's index in its sequence
        ke = ks + (len_k - len_q)[seq] + pos + 1
    else:
        ke = cu_k[1:][seq]
    return ks.to(torch.int32), ke.to(torch.int32)
