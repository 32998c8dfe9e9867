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


def _valid(row_indices, skv: int):
    """A row's valid indices (0 <= idx < SKV), in their slots' order, as int64."""
    idx = row_indices.long()
    return idx[(idx >= 0) & (idx < skv)]


def sparse_attention(q, kv, indices, sm_scale: float, v_dim: int, attn_sink=None, topk_length=None):
    """out[t, h] = sum_i softmax_i(sm_scale * q[t,h] . kv[idx_i]) * kv[idx_i, :v_dim] over valid idx_i.

    Valid: 0 <= idx < SKV. A row with no valid index gives out = 0 and lse = +inf. LSE is natural log.
    A NaN score (a NaN in q[t, h] or anywhere in a selected kv row) makes out[t, h] and lse[t, h]
    NaN: logsumexp and softmax propagate it.
    topk_length [S] (optional): row t reads only its first topk_length[t] slots (none for <= 0).
    attn_sink [H] (optional): out[t, h] *= 1 / (1 + exp(attn_sink[h] - lse[t, h])) (lse unchanged), the
    softmax with one more logit per head that has no value; a row with no valid index keeps out 0.
    """
    n_tokens, heads, _ = q.shape
    skv = kv.shape[0]
    out = torch.zeros(n_tokens, heads, v_dim, dtype=torch.float64, device=q.device)
    lse = torch.full((n_tokens, heads), math.inf, dtype=torch.float64, device=q.device)
    kv64 = kv.double()
    for t in range(n_tokens):
        slots = indices[t] if topk_length is None else indices[t, :max(int(topk_length[t]), 0)]
        idx = _valid(slots, skv)
        if idx.numel() == 0:
            continue
        rows = kv64[idx]  # [n, Dqk]
        scores = sm_scale * (q[t].double() @ rows.T)  # [H, n]
        lse[t] = torch.logsumexp(scores, dim=-1)
        out[t] = torch.softmax(scores, dim=-1) @ rows[:, :v_dim]
        if attn_sink is not None:
            out[t] /= (1 + torch.exp(attn_sink.double().to(q.device) - lse[t]))[:, None]
    return out, lse


def sparse_attention_bwd(q, kv, indices, out, lse, d_out, sm_scale: float, v_dim: int):
    """(dq [S, H, Dqk], dkv [SKV, Dqk]) float64: the gradients of sparse_attention's out, from the
    saved out and lse (a row's lse is what normalizes its P; nothing is recomputed from the softmax).

    Delta = sum_v d_out * out; P = exp(sm_scale * q . kv_i - lse) over valid i (0 for invalid ones,
    and for a row whose lse is +inf); dP = d_out . kv_i[:v_dim]; dS = P (dP - Delta).
    dq[t, h] = sm_scale * sum_i dS kv_i. dkv[j] sums, over every (t, i) with idx[t, i] == j,
    sm_scale * sum_h dS q[t, h] plus sum_h P d_out[t, h] in the first v_dim columns: a duplicate
    index adds twice, a row nobody selects gets 0.
    """
    n_tokens, heads, qk_dim = q.shape
    skv = kv.shape[0]
    kv64 = kv.double()
    dq = torch.zeros(n_tokens, heads, qk_dim, dtype=torch.float64, device=q.device)
    dkv = torch.zeros(skv, qk_dim, dtype=torch.float64, device=q.device)
    for t in range(n_tokens):
        idx = _valid(indices[t], skv)
        if idx.numel() == 0:
            continue
        rows = kv64[idx]  # [n, Dqk]
        q_t, do_t = q[t].double(), d_out[t].double()
        delta = (do_t * out[t].double()).sum(-1)  # [H]
        p = torch.exp(sm_scale * (q_t @ rows.T) - lse[t].double()[:, None])  # [H, n]
        ds = p * (do_t @ rows[:, :v_dim].T - delta[:, None])
        dq[t] = sm_scale * (ds @ rows)
        contrib = sm_scale * (ds.T @ q_t)  # [n, Dqk]
        contrib[:, :v_dim] += p.T @ do_t
        dkv.index_add_(0, idx, contrib)
    return dq, dkv


def _indexer_loss_row(iq_t, ik, w_t, aq_t, akv, alse_t, slots, sm_scale: float):
    """One query's valid selected keys, per-head indexer scores [Hi, n], logits [n] and the target
    p [n] (None where the attention puts no mass on the keys), all float64."""
    idx = slots.long()
    idx = idx[(idx >= 0) & (idx < ik.shape[0])]
    scores = iq_t.double() @ ik[idx].double().T
    relu = torch.where(scores < 0, torch.zeros_like(scores), scores)
    logits = (w_t.double()[:, None] * relu).sum(0)
    mass = torch.exp(sm_scale * (aq_t.double() @ akv[idx].double().T) - alse_t.double()[:, None]).sum(0)
    total = mass.sum()
    return idx, scores, relu, logits, (mass / total if total > 0 else None)


def indexer_loss(iq, ik, weights, aq, akv, alse, indices, sm_scale: float):
    """(loss [S], index_lse [S]) of the lightning indexer's training loss, float64.

    Per query t over its valid selected keys S_t (each slot once, duplicates kept):
    I[s] = sum_j w[t,j] relu(iq[t,j] . ik[s]); p[s] = sum_h exp(sm_scale aq[t,h] . akv[s] - alse[t,h]),
    L1-normalized over S_t; loss = sum_s p log p - sum_s p log_softmax(I)[s] (0 log 0 = 0);
    index_lse = logsumexp_s I[s]. No valid index: loss 0, index_lse +inf. No attention mass on
    S_t (p undefined): loss 0.
    """
    n = iq.shape[0]
    loss = torch.zeros(n, dtype=torch.float64, device=iq.device)
    lse = torch.full((n,), math.inf, dtype=torch.float64, device=iq.device)
    for t in range(n):
        idx, _, _, logits, p = _indexer_loss_row(iq[t], ik, weights[t], aq[t], akv, alse[t], indices[t], sm_scale)
        if idx.numel() == 0:
            continue
        lse[t] = torch.logsumexp(logits, 0)
        if p is not None:
            loss[t] = torch.xlogy(p, p).sum() - (p * (logits - lse[t])).sum()
    return loss, lse


def indexer_loss_bwd(iq, ik, weights, aq, akv, alse, indices, sm_scale: float, index_lse, d_loss):
    """(d_iq [S, Hi, Di], d_ik [SKV, Di], d_weights [S, Hi]) of indexer_loss, float64, written out:
    dI[t,s] = d_loss[t] (exp(I[t,s] - index_lse[t]) - p[t,s]) over the row's valid slots, then
    d_weights[t,j] = sum_s dI relu(iq[t,j].ik[s]); with G[j,s] = dI[t,s] w[t,j] 1[iq[t,j].ik[s] > 0]:
    d_iq[t,j] = sum_s G[j,s] ik[s] and d_ik[s] += sum_j G[j,s] iq[t,j] (a scatter over queries).
    The target p is detached (no gradient into aq, akv, alse). Rows whose loss is defined as 0
    (no valid index, no attention mass) contribute nothing."""
    d_iq = torch.zeros(iq.shape, dtype=torch.float64, device=iq.device)
    d_ik = torch.zeros(ik.shape, dtype=torch.float64, device=iq.device)
    d_w = torch.zeros(weights.shape, dtype=torch.float64, device=iq.device)
    for t in range(iq.shape[0]):
        idx, scores, relu, logits, p = _indexer_loss_row(iq[t], ik, weights[t], aq[t], akv, alse[t], indices[t],
                                                         sm_scale)
        if idx.numel() == 0 or p is None:
            continue
        d_logits = d_loss[t].double() * (torch.exp(logits - index_lse[t].double()) - p)
        d_w[t] = relu @ d_logits
        g = weights[t].double()[:, None] * (scores > 0) * d_logits[None, :]  # [Hi, n]
        d_iq[t] = g @ ik[idx].double()
        d_ik.index_add_(0, idx, g.T @ iq[t].double())
    return d_iq, d_ik, d_w
