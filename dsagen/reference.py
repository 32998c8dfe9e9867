"""Float64 PyTorch references of the three DSA stages, written from the math, not from the kernels.

The tests compare every generated kernel against these, and the tuner uses them to reject a fast
but wrong candidate. They are slow on purpose: plain loops over rows where that is clearer.

NaN (docs/numerics.md): it propagates to what it touches. A NaN input makes the indexer logits it
enters NaN (relu keeps NaN); top-k ranks NaN above +inf, as torch.topk does; a NaN score makes that
(token, head)'s attention out and lse NaN. The kernels of both backends follow these rules.
"""
from __future__ import annotations

import math

import torch


def indexer(q, k, k_scale, weights, ks, ke):
    """logits[t, s] = k_scale[s] * sum_j w[t, j] * relu(q[t, j] . k[s]) for ks[t] <= s < ke[t], else -inf.

    A NaN in q[t], w[t], k[s] or k_scale[s] makes logits[t, s] NaN inside the window (relu(NaN) is
    NaN, and NaN * 0 is NaN); outside it, -inf as always."""
    q64, k64, w64 = q.double(), k.double(), weights.double()
    scores = torch.einsum("thd,sd->ths", q64, k64)
    scores = torch.where(scores < 0, torch.zeros_like(scores), scores)  # relu that keeps NaN
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
    selected *indices* ambiguous, never these values. NaN ranks above +inf and NaNs tie (torch.topk's
    order): a row's values start with its NaNs, up to k of them, then its largest other values.
    """
    rows = []
    skv = logits.shape[1]
    for t in range(logits.shape[0]):
        lo, hi = window(ks, ke, skv, t)
        vals = logits[t, lo:hi].double()
        n = min(k, hi - lo)
        nan = torch.isnan(vals)
        ordered = torch.cat([vals[nan], torch.sort(vals[~nan], descending=True).values])
        rows.append(ordered[:n])
    return rows


def sparse_attention(q, kv, indices, sm_scale: float, v_dim: int):
    """out[t, h] = sum_i softmax_i(sm_scale * q[t,h] . kv[idx_i]) * kv[idx_i, :v_dim] over valid idx_i.

    Valid: 0 <= idx < SKV. A row with no valid index gives out = 0 and lse = +inf. LSE is natural log.
    A NaN score (a NaN in q[t, h] or anywhere in a selected kv row) makes out[t, h] and lse[t, h]
    NaN: logsumexp and softmax propagate it.
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
