"""Float64 PyTorch references of the three DSA stages, written from the math, not from the kernels.

The tests compare every generated kernel against these, and the tuner uses them to reject a fast
but wrong candidate. They are slow on purpose: plain loops over rows where that is clearer.
"""
from __future__ import annotations

import math

import torch


def indexer(q, k, k_scale, weights, ks, ke):
    """logits[t, s] = k_scale[s] * sum_j w[t, j] * relu(q[t, j] . k[s]) for ks[t] <= s < ke[t], else -inf."""
    q64, k64, w64 = q.double(), k.double(), weights.double()
    scores = torch.einsum("thd,sd->ths", q64, k64).clamp_min(0)
    logits = torch.einsum("ths,th->ts", scores, w64)
    if k_scale is not None:
        logits = logits * k_scale.double()[None, :]
    cols = torch.arange(k.shape[0], device=q.device)[None, :]
    inside = (cols >= ks.long()[:, None]) & (cols < ke.long()[:, None])
    return torch.where(inside, logits, torch.full_like(logits, -math.inf))


def window(ks, ke, skv: int, t: int) -> tuple[int, int]:
    """Row t's key window clamped to [0, skv)."""
    lo = max(int(ks[t]), 0)
    hi = min(int(ke[t]), skv)
    return lo, max(hi, lo)


def topk_values(logits, ks, ke, k: int):
    """Per row, the sorted (descending) k largest values of the window: what any exact top-k selects.

    Returns a list of float64 tensors, one per row, of length min(k, window length). Ties make the
    selected *indices* ambiguous, never these values.
    """
    rows = []
    skv = logits.shape[1]
    for t in range(logits.shape[0]):
        lo, hi = window(ks, ke, skv, t)
        vals = logits[t, lo:hi].double()
        n = min(k, hi - lo)
        rows.append(torch.sort(vals, descending=True).values[:n])
    return rows


def sparse_attention(q, kv, indices, sm_scale: float, v_dim: int):
    """out[t, h] = sum_i softmax_i(sm_scale * q[t,h] . kv[idx_i]) * kv[idx_i, :v_dim] over valid idx_i.

    Valid: 0 <= idx < SKV. A row with no valid index gives out = 0 and lse = +inf. LSE is natural log.
    """
    n_tokens, heads, _ = q.shape
    skv = kv.shape[0]
    out = torch.zeros(n_tokens, heads, v_dim, dtype=torch.float64, device=q.device)
    lse = torch.full((n_tokens, heads), math.inf, dtype=torch.float64, device=q.device)
    kv64 = kv.double()
    for t in range(n_tokens):
        idx = indices[t].long()
        idx = idx[(idx >= 0) & (idx < skv)]
        if idx.numel() == 0:
            continue
        rows = kv64[idx]  # [n, Dqk]
        scores = sm_scale * (q[t].double() @ rows.T)  # [H, n]
        lse[t] = torch.logsumexp(scores, dim=-1)
        out[t] = torch.softmax(scores, dim=-1) @ rows[:, :v_dim]
    return out, lse
