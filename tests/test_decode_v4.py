"""decode() for a DeepSeek-V4 spec: the MODEL1 cache, a sink per head and the sliding-window cache,
one step through the pipeline (paged indexer -> decode top-k -> sparse decode over the selection
and the window in one softmax) against float64 attention over the dequantized rows of both caches;
and the spec's rules for the V4 arguments (required when the spec has them, refused when not)."""
from __future__ import annotations

import math

import pytest
import torch

import dsagen
from dsagen import reference
from dsagen.cache_formats import MLA_FORMATS, dequantize_mla_pages, pack_index_pages, quantize_mla_pages
from dsagen.verify import assert_close

MODEL1 = MLA_FORMATS["deepseek_v4_fp8"]
PAGE, WINDOW_PAGE, WINDOW = 7, 5, 4


def v4_spec(sink=True, window=WINDOW):
    return dsagen.Spec(indexer=dsagen.IndexerSpec(heads=3, head_dim=40, dtype="fp8_e4m3"), topk=dsagen.TopKSpec(k=6),
                       attention=dsagen.AttentionSpec(heads=3, qk_dim=512, v_dim=512, sink=sink),
                       cache=dsagen.CacheSpec(page_size=PAGE, mla_format="deepseek_v4_fp8", window=window),
                       name="v4-small")


class Step:
    """Two requests with shuffled pages; the window cache holds each request's last WINDOW tokens."""

    def __init__(self, gen, context_lens=(23, 3), next_n=2, max_blocks=4):
        B, ix = len(context_lens), v4_spec().indexer
        n_pages = B * max_blocks + 1
        self.block_table = torch.randperm(n_pages, generator=gen)[:B * max_blocks].reshape(B, max_blocks).int()
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32)
        keys = (torch.randn(n_pages * PAGE, ix.head_dim, generator=gen) * 20).clamp(-448, 448).to(torch.float8_e4m3fn)
        scales = torch.exp2(torch.randint(-3, 3, (n_pages * PAGE,), generator=gen).float())
        self.index_cache = pack_index_pages(keys, scales, PAGE)
        rows = (torch.randn(n_pages * PAGE, 512, generator=gen) * 3).bfloat16()
        self.mla_cache = quantize_mla_pages(rows, MODEL1, PAGE)
        n_window_pages = 2 * B
        window_rows = (torch.randn(n_window_pages * WINDOW_PAGE, 512, generator=gen) * 3).bfloat16()
        self.window_cache = quantize_mla_pages(window_rows, MODEL1, WINDOW_PAGE)
        slots = torch.randperm(n_window_pages * WINDOW_PAGE, generator=gen)[:B * WINDOW].reshape(B, 1, WINDOW)
        self.window_indices = slots.expand(B, next_n, WINDOW).clone().int()
        self.window_indices[1, :, 2:] = -1  # a request with fewer window tokens than the window
        self.window_indices[0, 1, 0] = 2**31 - 1  # an invalid slot
        self.q = torch.randn(B, next_n, 3, 512, generator=gen).bfloat16()
        self.index_q = (torch.randn(B, next_n, ix.heads, ix.head_dim, generator=gen) * 8).to(torch.float8_e4m3fn)
        self.weights = torch.randn(B * next_n, ix.heads, generator=gen)
        self.sink = torch.tensor([math.inf, -math.inf, 0.7])

    def args(self, device):
        return [t.to(device) for t in (self.q, self.mla_cache, self.index_q, self.index_cache, self.weights,
                                       self.context_lens, self.block_table)]


def test_a_v4_decode_step_attends_the_selection_and_the_window_in_one_softmax(gen, device):
    spec, step = v4_spec(), Step(gen)
    kernels = dsagen.build(spec)
    res = kernels.decode(*step.args(device), attn_sink=step.sink.to(device),
                         window_cache=step.window_cache.to(device), window_indices=step.window_indices.to(device))
    B, s_q, H = step.q.shape[:3]
    main64, window64 = dequantize_mla_pages(step.mla_cache, MODEL1), dequantize_mla_pages(step.window_cache, MODEL1)
    rows64 = torch.cat([main64, window64])
    offset = main64.shape[0]
    slots = res.slots.cpu().long().reshape(B * s_q, -1)
    win = step.window_indices.long().reshape(B * s_q, -1)
    win = torch.where((win >= 0) & (win < window64.shape[0]), win + offset, -1)
    indices = torch.cat([torch.where((slots >= 0) & (slots < offset), slots, -1), win], dim=1)
    ref_out, ref_lse = reference.sparse_attention(step.q.reshape(B * s_q, H, 512), rows64, indices,
                                                  spec.attention.softmax_scale, 512, attn_sink=step.sink)
    assert_close("sparse_decode.out", res.out.reshape(B * s_q, H, 512), ref_out)
    assert_close("sparse_decode.lse", res.lse.reshape(B * s_q, H), ref_lse)
    assert (res.out[:, :, 0] == 0).all(), "sink +inf zeroes its head"
    plain = kernels.sparse_decode(*[t.to(device) for t in (step.q, step.mla_cache)], res.slots,
                                  attn_sink=step.sink.to(device))
    assert not torch.equal(plain.lse if hasattr(plain, "lse") else plain[1], res.lse), "the window must count"


def test_the_spec_decides_which_v4_arguments_a_step_takes(gen):
    step = Step(gen)
    v4 = dsagen.build(v4_spec())
    window = dict(window_cache=step.window_cache, window_indices=step.window_indices)
    with pytest.raises(ValueError, match="attn_sink is required: spec 'v4-small' has attention.sink = true"):
        v4.decode(*step.args("cpu"), **window)
    with pytest.raises(ValueError, match="window_cache is required: spec 'v4-small' has cache.window = 4"):
        v4.decode(*step.args("cpu"), attn_sink=step.sink)
    with pytest.raises(ValueError, match=r"window_indices must have shape \[B, s_q, window\] = \[2, 2, 4\]"):
        v4.decode(*step.args("cpu"), attn_sink=step.sink, window_cache=step.window_cache,
                  window_indices=step.window_indices[:, :, :3])
    plain = dsagen.build(v4_spec(sink=False, window=0))
    with pytest.raises(ValueError, match="attn_sink was given, but spec 'v4-small' has no sink"):
        plain.decode(*step.args("cpu"), attn_sink=step.sink)
    with pytest.raises(ValueError, match="window_cache was given, but spec 'v4-small' has no window cache"):
        plain.decode(*step.args("cpu"), **window)


def test_dsa_with_a_sink_spec_applies_the_sink_to_the_selected_attention(gen, device):
    """Prefill for a spec with attention.sink = true: dsa() takes attn_sink [H] and the kernel
    scales out by 1 / (1 + exp(sink - lse)), lse unchanged; a spec without one refuses it."""
    spec = dsagen.Spec(indexer=dsagen.IndexerSpec(heads=2, head_dim=24, dtype="bf16"), topk=dsagen.TopKSpec(k=5),
                       attention=dsagen.AttentionSpec(heads=3, qk_dim=48, v_dim=48, sink=True), name="sinks")
    kernels = dsagen.build(spec)
    S, SKV = 4, 19
    iq = torch.randn(S, 2, 24, generator=gen).bfloat16().to(device)
    ik = torch.randn(SKV, 24, generator=gen).bfloat16().to(device)
    w = torch.randn(S, 2, generator=gen).to(device)
    ks = torch.zeros(S, dtype=torch.int32, device=device)
    ke = torch.tensor([0, 3, 11, 19], dtype=torch.int32, device=device)
    q = torch.randn(S, 3, 48, generator=gen).bfloat16().to(device)
    kv = torch.randn(SKV, 48, generator=gen).bfloat16().to(device)
    sink = torch.tensor([math.inf, -math.inf, 0.3], device=device)
    res = kernels.dsa(q, kv, iq, ik, None, w, ks, ke, attn_sink=sink)
    ref_out, ref_lse = reference.sparse_attention(q.cpu(), kv.cpu(), res.indices.cpu(), spec.attention.softmax_scale,
                                                  48, attn_sink=sink.cpu())
    assert_close("sparse_attention.out", res.out, ref_out)
    assert_close("sparse_attention.lse", res.lse, ref_lse)
    assert torch.isposinf(res.lse[0]).all() and (res.out[0] == 0).all(), "an empty window: out 0, lse +inf"
    with pytest.raises(ValueError, match="attn_sink is required: spec 'sinks' has attention.sink = true"):
        kernels.dsa(q, kv, iq, ik, None, w, ks, ke)
    plain = dsagen.build(dsagen.Spec(indexer=spec.indexer, topk=spec.topk, name="plain",
                                     attention=dsagen.AttentionSpec(heads=3, qk_dim=48, v_dim=48)))
    with pytest.raises(ValueError, match="attn_sink was given, but spec 'plain' has no sink"):
        plain.dsa(q, kv, iq, ik, None, w, ks, ke, attn_sink=sink)
