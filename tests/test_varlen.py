"""Varlen batches: the per-row windows from cu_seqlens, and a whole dsa() over such a batch."""
from __future__ import annotations

import pytest
import torch

import dsagen
from dsagen import reference
from dsagen.varlen import windows_from_cu_seqlens
from dsagen.verify import assert_close, assert_topk


def loop_windows(len_q, len_k, causal):
    ks, ke, start = [], [], 0
    for lq, lk in zip(len_q, len_k):
        for i in range(lq):
            ks.append(start)
            ke.append(start + (lk - lq + i + 1 if causal else lk))
        start += lk
    return torch.tensor(ks, dtype=torch.int32), torch.tensor(ke, dtype=torch.int32)


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("len_q,len_k", [([5, 7, 1], [40, 7, 13]), ([3], [3]), ([0, 4, 0], [2, 9, 0])],
                         ids=["B3", "B1", "empty-sequences"])
def test_windows_match_a_loop_over_sequences(len_q, len_k, causal):
    ks, ke = windows_from_cu_seqlens(cu(len_q), cu(len_k), causal=causal)
    want_ks, want_ke = loop_windows(len_q, len_k, causal)
    assert ks.dtype == ke.dtype == torch.int32
    assert torch.equal(ks, want_ks) and torch.equal(ke, want_ke)


def test_self_attention_prefill_needs_only_the_query_offsets():
    ks, ke = windows_from_cu_seqlens(cu([3, 2]))
    assert ks.tolist() == [0, 0, 0, 3, 3] and ke.tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("bad,match", [
    ((torch.tensor([1, 3], dtype=torch.int32), None), "start at 0"),
    ((torch.tensor([0, 3, 2], dtype=torch.int32), None), "never decrease"),
    ((torch.tensor([0, 3], dtype=torch.float32), None), "int32 or int64"),
    ((cu([4]), cu([2])), "at least as many keys as queries"),
    ((cu([4, 1]), cu([5])), "both describe the same batch"),
])
def test_bad_offsets_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        windows_from_cu_seqlens(*bad)


def test_dsa_over_a_varlen_batch_stays_inside_each_sequence(gen, device):
    spec = dsagen.Spec(indexer=dsagen.IndexerSpec(heads=3, head_dim=40, dtype="bf16"), topk=dsagen.TopKSpec(k=6),
                       attention=dsagen.AttentionSpec(heads=5, qk_dim=80, v_dim=48))
    kernels = dsagen.build(spec)
    len_q, len_k = [4, 3], [23, 9]
    ks, ke = windows_from_cu_seqlens(cu(len_q), cu(len_k))
    S, SKV = sum(len_q), sum(len_k)
    q_idx = torch.randn(S, 3, 40, generator=gen).bfloat16()
    k_idx = torch.randn(SKV, 40, generator=gen).bfloat16()
    w = torch.randn(S, 3, generator=gen)
    q = torch.randn(S, 5, 80, generator=gen).bfloat16()
    kv = torch.randn(SKV, 80, generator=gen).bfloat16()
    on = [t.to(device) for t in (q, kv, q_idx, k_idx, w, ks, ke)]
    res = kernels.dsa(*on[:4], None, *on[4:])
    logits = reference.indexer(q_idx, k_idx, None, w, ks, ke)
    assert_topk(res.indices, logits, ks, ke, 6, tolerance=1e-5)
    ref_out, ref_lse = reference.sparse_attention(q, kv, res.indices.cpu(), spec.attention.softmax_scale, 48)
    assert_close("sparse_attention.out", res.out, ref_out)
    assert_close("sparse_attention.lse", res.lse, ref_lse)
