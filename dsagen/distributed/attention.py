"""Sparse attention over keys split across ranks: each rank attends over the selected keys it
holds, and the partial (out, lse) pairs of every rank are all-gathered and merged by their LSEs."""
from __future__ import annotations

import math

import torch

from .comm import all_gather_stacked, group_rank
from .merge import merge_attention


def merge_attention_over_ranks(out: torch.Tensor, lse: torch.Tensor, group=None, kernels=None,
                               attn_sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the whole key set from this rank's partial: every rank's partials all-gathered
    (out in its dtype and lse in fp32, per query and head) and merged by merge_attention, the sink
    (attn_sink [H]) applied once to the merged out. On one rank the partial is the whole: it comes
    back as it is (with a sink, through the merge of that one partial). kernels: the build whose
    lse_merge merges."""
    _, world = group_rank(group)
    if world == 1:
        return (out, lse) if attn_sink is None else merge_attention(out[None], lse[None], kernels, attn_sink)
    return merge_attention(all_gather_stacked(out, group), all_gather_stacked(lse, group), kernels, attn_sink)


def no_mass(q: torch.Tensor, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial of a rank that holds no key: out 0 and lse +inf per (query, head)."""
    out = q.new_zeros((*q.shape[:-1], v_dim))
    return out, torch.full(q.shape[:-1], math.inf, dtype=torch.float32, device=q.device)


def key_sharded_attention(kernels, q, kv, mine, group=None, sm_scale: float | None = None):
    """(out [S, H, Dv], lse [S, H]) of sparse attention over the selected keys of every rank.

    q [S, H, Dqk]: every query row (the same on every rank); kv [n_local, Dqk]: this rank's rows;
    mine [S, k]: this rank's local rows among the selected keys (KeySelection.mine: -1 where another
    rank holds the key). The merged result is the same on every rank; on one rank it is the plain
    sparse attention's."""
    group_rank(group)
    if kv.shape[0]:
        out, lse = kernels.sparse_attention(q, kv, mine, sm_scale)
    else:
        out, lse = no_mass(q, kernels.spec.attention.v_dim)
    return merge_attention_over_ranks(out, lse, group, kernels)
