"""dsagen.distributed against the single-process kernels and the float64 references, in real gloo
process groups.

One start of 4 rank processes (a subprocess each, this file run as a script, a FileStore) serves
every distributed test: each scenario runs at world sizes 2, 3 and 4 (sub-groups of the 4 ranks),
with uneven and empty shards, a rank whose shard holds no selected key and empty rows, and writes
its verdict per (scenario, world size); the tests below read those verdicts. Every rank draws the
same global inputs from one seed and takes its shard. Indices and positions must equal the
single-process kernels' exactly (a deterministic build: the same schedule whatever the shape);
attention outputs, LSEs and gradients must match float64 within the kernels' tolerances.

The LSE merge, the selection keys and the shardings' position maps are also checked here in plain
torch, without a process group.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import traceback

import pytest
import torch

import dsagen
from dsagen import reference
from dsagen.cache_formats import MLA_FORMATS, dequantize_mla_rows, pack_index_pages, quantize_mla_rows
from dsagen.decode import positions_to_slots
from dsagen.distributed import (Sharding, count_wire_bytes, key_sharded_attention, key_sharded_select,
                                merge_attention, merge_topk, row_sharded_select, selection_keys, sharded_decode,
                                sharded_indexer_loss, sharded_sparse_attention)
from dsagen.distributed.select import ordered_image
from dsagen.verify import assert_close, assert_topk, tolerance

RANKS = 4
WORLDS = (2, 3, 4)
FMT = MLA_FORMATS["deepseek_v32_fp8"]


def prefill_spec(k=8):
    return dsagen.Spec(indexer=dsagen.IndexerSpec(heads=2, head_dim=16, dtype="bf16"), topk=dsagen.TopKSpec(k=k),
                       attention=dsagen.AttentionSpec(heads=3, qk_dim=40, v_dim=24))


def serving_spec(k=8):
    return dsagen.Spec(indexer=dsagen.IndexerSpec(heads=2, head_dim=32, dtype="fp8_e4m3"), topk=dsagen.TopKSpec(k=k),
                       attention=dsagen.AttentionSpec(heads=2, qk_dim=576, v_dim=512),
                       cache=dsagen.CacheSpec(page_size=4))


def causal_mix_windows(S, SKV):
    """Causal windows ending at the last key, with an empty row (ks == ke), an inverted one, one
    past the keys on both sides and one shorter than k."""
    ke = torch.arange(SKV - S + 1, SKV + 1)
    ks = torch.zeros(S, dtype=torch.long)
    ks[1], ke[1] = 7, 7
    ks[2], ke[2] = 30, 4
    ks[3], ke[3] = -5, SKV + 9
    ks[4], ke[4] = SKV - 3, SKV
    return ks.int(), ke.int()


def sorted_rows(x):
    return x.long().sort(-1).values


# ------------------------------------------------------------------------------------------------
# scenarios: run inside each rank, raise AssertionError on a mismatch

@dataclasses.dataclass
class Rank:
    rank: int
    world: int
    group: object
    gen: torch.Generator
    kernels: dict


def uneven_sizes(total, world, rank_empty: bool):
    """A split with uneven shards; at world 3, rank 1 holds nothing when rank_empty."""
    if world == 3 and rank_empty:
        return (total // 3, 0, total - total // 3)
    if world == 2:
        return (total - total // 3, total // 3)
    return None  # the default (tensor_split) split


def prefill_inputs(ctx, S, SKV, ties: bool):
    spec = ctx.kernels["prefill"].spec
    ix, g = spec.indexer, ctx.gen
    q = torch.randn(S, ix.heads, ix.head_dim, generator=g).bfloat16()
    k = torch.randn(SKV, ix.head_dim, generator=g).bfloat16()
    if ties:  # five distinct keys: every logit value shared by many positions, on every rank
        k = k[torch.arange(SKV) % 5]
    k_scale = torch.rand(SKV, generator=g) + 0.5
    if ties:
        k_scale = torch.ones(SKV)
    w = torch.randn(S, ix.heads, generator=g)
    ks, ke = causal_mix_windows(S, SKV)
    return q, k, k_scale, w, ks, ke


def scenario_row_prefill(ctx: Rank):
    """Query rows split (uneven, an empty shard at world 3): indices equal the single-process
    indexer + top-k bitwise, and satisfy the exact top-k contract on float64 logits."""
    K = ctx.kernels["prefill"]
    S, SKV, k = 9, 50, K.spec.topk.k
    q, key, k_scale, w, ks, ke = prefill_inputs(ctx, S, SKV, ties=False)
    rows = Sharding.contiguous(S, ctx.world, uneven_sizes(S, ctx.world, rank_empty=True))
    part = lambda x: rows.shard(x, ctx.rank)
    with count_wire_bytes() as wire:
        sel = row_sharded_select(K, part(q), key, k_scale, part(w), part(ks), part(ke), rows, ctx.group)
    single = K.topk(K.indexer(q, key, k_scale, w, ks, ke), ks, ke)
    assert torch.equal(sel.indices, single), "row-sharded indices differ from the single-process top-k"
    assert torch.equal(sel.local, part(single))
    assert_topk(sel.indices, reference.indexer(q, key, k_scale, w, ks, ke), ks, ke, k,
                tolerance=tolerance("indexer.logits.bf16"))
    assert wire.received == (ctx.world - 1) * max(rows.sizes) * k * 4, wire
    assert (sel.indices[1] == -1).all() and (sel.indices[2] == -1).all(), "empty windows select nothing"


def key_sharded_case(ctx, kind, ties):
    K = ctx.kernels["prefill"]
    S, SKV = 7, 61
    q, key, k_scale, w, ks, ke = prefill_inputs(ctx, S, SKV, ties=ties)
    if not ties:
        key[40, 3] = math.nan  # a NaN logit column: selected first by every row that sees key 40
    if kind == "round_robin":
        keys = Sharding.round_robin(SKV, ctx.world)
    else:
        keys = Sharding.contiguous(SKV, ctx.world, uneven_sizes(SKV, ctx.world, rank_empty=True))
    part = lambda x: keys.shard(x, ctx.rank)
    sel = key_sharded_select(K, q, part(key), part(k_scale), w, ks, ke, keys, ctx.group)
    logits = K.indexer(q, key, k_scale, w, ks, ke)
    single = K.topk(logits, ks, ke)
    assert torch.equal(sorted_rows(sel.indices), sorted_rows(single)), \
        "merged global top-k differs from the single-process top-k"
    check_located(sel, keys)
    check_best_first(sel.indices, logits)
    at = K.spec.attention
    aq = torch.randn(S, at.heads, at.qk_dim, generator=ctx.gen).bfloat16()
    kv = torch.randn(SKV, at.qk_dim, generator=ctx.gen).bfloat16()
    out, lse = key_sharded_attention(K, aq, part(kv), sel.mine, ctx.group)
    ref_out, ref_lse = reference.sparse_attention(aq, kv, sel.indices, at.softmax_scale, at.v_dim)
    assert_close("sparse_attention.out", out, ref_out)
    assert_close("sparse_attention.lse", lse, ref_lse)


def check_located(sel, keys: Sharding):
    """owner / local / mine agree with the sharding's position maps."""
    g = sel.indices.long()
    assert torch.equal(sel.owner.long(), keys.owner(g)) and torch.equal(sel.local.long(), keys.to_local(g))
    for r in range(keys.world):
        back = keys.to_global(torch.where(sel.owner.long() == r, sel.local.long(), -1), r)
        assert torch.equal(back[sel.owner == r], g[sel.owner == r])


def check_best_first(indices, logits):
    """Each row lists its keys by (value, then lower position): the selection keys decrease."""
    values = logits.gather(1, indices.long().clamp_min(0))
    keys = selection_keys(values, indices)
    assert (keys[:, :-1] >= keys[:, 1:]).all()


def scenario_key_prefill_contiguous(ctx: Rank):
    key_sharded_case(ctx, "contiguous", ties=False)


def scenario_key_prefill_round_robin(ctx: Rank):
    key_sharded_case(ctx, "round_robin", ties=False)


def scenario_key_prefill_ties(ctx: Rank):
    """Five distinct key values over 61 keys: the k-th value is shared across ranks, and the merge
    must keep the lower global positions, as the single-process top-k does."""
    key_sharded_case(ctx, "round_robin", ties=True)
    key_sharded_case(ctx, "contiguous", ties=True)


def scenario_key_prefill_idle_rank(ctx: Rank):
    """Positive queries, keys and weights: every logit > 0 except on the last rank's keys, whose
    scale is 0: that rank's shard holds no selected key, its partial attention has lse +inf."""
    K = ctx.kernels["prefill"]
    S, SKV, g = 5, 43, ctx.gen
    ix, at = K.spec.indexer, K.spec.attention
    q = (torch.rand(S, ix.heads, ix.head_dim, generator=g) + 0.1).bfloat16()
    key = (torch.rand(SKV, ix.head_dim, generator=g) + 0.1).bfloat16()
    w = torch.rand(S, ix.heads, generator=g) + 0.1
    keys = Sharding.contiguous(SKV, ctx.world)
    idle = ctx.world - 1
    k_scale = torch.ones(SKV)
    k_scale[keys.starts[idle]:] = 0.0
    ks = torch.zeros(S, dtype=torch.int32)
    ke = torch.full((S,), SKV, dtype=torch.int32)
    part = lambda x: keys.shard(x, ctx.rank)
    sel = key_sharded_select(K, q, part(key), part(k_scale), w, ks, ke, keys, ctx.group)
    assert not (sel.owner == idle).any(), "the zero-scale shard must hold no selected key"
    single = K.topk(K.indexer(q, key, k_scale, w, ks, ke), ks, ke)
    assert torch.equal(sorted_rows(sel.indices), sorted_rows(single))
    aq = torch.randn(S, at.heads, at.qk_dim, generator=g).bfloat16()
    kv = torch.randn(SKV, at.qk_dim, generator=g).bfloat16()
    out, lse = key_sharded_attention(K, aq, part(kv), sel.mine, ctx.group)
    ref_out, ref_lse = reference.sparse_attention(aq, kv, sel.indices, at.softmax_scale, at.v_dim)
    assert_close("sparse_attention.out", out, ref_out)
    assert_close("sparse_attention.lse", lse, ref_lse)


# -- decode ----------------------------------------------------------------------------------------

class PagedTokens:
    """Per request, its tokens' index keys (fp8), scales and MLA rows (bf16), in position order."""

    def __init__(self, gen, spec, contexts):
        di = spec.indexer.head_dim
        self.keys = [(torch.randn(n, di, generator=gen) * 20).clamp(-448, 448).to(torch.float8_e4m3fn)
                     for n in contexts]
        self.scales = [torch.exp2(torch.randint(-3, 3, (n,), generator=gen).float()) for n in contexts]
        self.rows = [(torch.randn(n, spec.attention.qk_dim, generator=gen) * 3).bfloat16() for n in contexts]

    def take(self, rank, world):
        """The tokens rank `rank` holds under the round-robin layout, by local position."""
        pick = lambda xs: [x[rank::world] for x in xs]
        out = PagedTokens.__new__(PagedTokens)
        out.keys, out.scales, out.rows = pick(self.keys), pick(self.scales), pick(self.rows)
        return out


def paged_caches(gen, tokens: PagedTokens, page, spare_columns=1):
    """(index_cache, mla_cache, block_table) holding the tokens in shuffled pages; each table row
    has `spare_columns` more entries, naming a page of 0xFF bytes (NaN everywhere), which the
    kernels may read past a request's context but must never let through."""
    counts = [x.shape[0] for x in tokens.keys]
    pages = [max(1, -(-n // page)) for n in counts]
    n_pages = sum(pages) + 1  # the last page: garbage
    order = torch.randperm(n_pages - 1, generator=gen)
    width = max(pages) + spare_columns
    table = torch.full((len(counts), width), n_pages - 1, dtype=torch.int32)
    di = tokens.keys[0].shape[1] if tokens.keys else 1
    keys = torch.full((n_pages * page, di), 0xFF, dtype=torch.uint8).view(torch.float8_e4m3fn)
    scales = torch.full((n_pages * page,), math.nan)
    mla = torch.full((n_pages * page, FMT.bytes_per_token), 0xFF, dtype=torch.uint8)
    at = 0
    for b, n in enumerate(counts):
        table[b, :pages[b]] = order[at:at + pages[b]].int()
        at += pages[b]
        pos = torch.arange(n)
        slots = table[b].long()[pos // page] * page + pos % page
        keys[slots], scales[slots] = tokens.keys[b], tokens.scales[b]
        if n:
            mla[slots] = quantize_mla_rows(tokens.rows[b], FMT)
    index_cache = pack_index_pages(keys, scales, page)
    return index_cache, mla.reshape(n_pages, page, 1, FMT.bytes_per_token), table


def rank0_wins_request0(gen, tokens, index_q, weights, n, world):
    """Request 0: positive queries, keys and weights (every logit > 0), and scales 2^8 on rank 0's
    tokens against 2^-8 elsewhere: rank 0 holds all of its selected keys (each rank beside it
    none), so losing one local candidate of rank 0 (to a position past its window) would show."""
    ix_shape = index_q[0].shape
    index_q[0] = ((torch.rand(ix_shape, generator=gen) + 0.1) * 8).to(torch.float8_e4m3fn)
    weights[:index_q.shape[1]] = torch.rand(index_q.shape[1], weights.shape[1], generator=gen) + 0.1
    tokens.keys[0] = ((torch.rand(tokens.keys[0].shape, generator=gen) + 0.1) * 20).to(torch.float8_e4m3fn)
    tokens.scales[0] = torch.where(torch.arange(n) % world == 0, 2.0**8, 2.0**-8)


def scenario_decode(ctx: Rank):
    """Round-robin caches (each rank its own shuffled pages and table, NaN bytes past every
    context, which the widened local window reaches): the selected positions equal the
    single-process paged indexer + decode top-k; the merged attention matches float64 over them.
    Request 0's keys all live on rank 0; request 1 has 1 token (row 0 of it sees none, and most
    ranks hold nothing of it); request 2 has fewer tokens than k."""
    K = ctx.kernels["serving"]
    spec, g = K.spec, ctx.gen
    ix, at, page = spec.indexer, spec.attention, spec.cache.page_size
    contexts, next_n, k = [37, 1, 6, 23], 2, spec.topk.k
    B = len(contexts)
    tokens = PagedTokens(g, spec, contexts)
    q = torch.randn(B, next_n, at.heads, at.qk_dim, generator=g).bfloat16()
    index_q = (torch.randn(B, next_n, ix.heads, ix.head_dim, generator=g) * 8).to(torch.float8_e4m3fn)
    weights = torch.randn(B * next_n, ix.heads, generator=g)
    rank0_wins_request0(g, tokens, index_q, weights, contexts[0], ctx.world)
    lens = torch.tensor(contexts, dtype=torch.int32)
    g_index, g_mla, g_table = paged_caches(g, tokens, page)
    l_index, l_mla, l_table = paged_caches(g, tokens.take(ctx.rank, ctx.world), page, spare_columns=2)
    res = sharded_decode(K, q, l_mla, index_q, l_index, weights, lens, l_table, ctx.group)

    width = g_table.shape[1]
    identity = torch.arange(width, dtype=torch.int32).expand(B, width).contiguous()
    logits = K.paged_indexer(index_q, g_index, weights, lens, g_table)
    single = K.decode_topk(logits, lens, identity)  # slots of an identity table: positions
    assert torch.equal(sorted_rows(res.positions), sorted_rows(single)), "global positions differ"
    check_best_first(res.positions.reshape(B * next_n, k), logits)
    owned = (res.positions >= 0) & (res.positions.long() % ctx.world == ctx.rank)
    assert torch.equal(res.slots >= 0, owned), "this rank's slots are exactly its own positions"
    g_slots = positions_to_slots(res.positions.reshape(B * next_n, k), g_table, page, next_n)
    rows64 = dequantize_mla_rows(g_mla.reshape(-1, FMT.bytes_per_token), FMT)
    ref_out, ref_lse = reference.sparse_attention(q.reshape(B * next_n, at.heads, at.qk_dim), rows64,
                                                  g_slots.reshape(B * next_n, k), at.softmax_scale, at.v_dim)
    assert_close("sparse_decode.out", res.out.reshape(B * next_n, at.heads, at.v_dim), ref_out)
    assert_close("sparse_decode.lse", res.lse.reshape(B * next_n, at.heads), ref_lse)
    assert (res.lse[1, 0] == math.inf).all() and (res.out[1, 0] == 0).all(), "an empty row: out 0, lse +inf"
    assert (res.positions[0] % ctx.world == 0).all(), "request 0 selects rank 0's tokens only"
    # a sink applies once, after the merge: lse as without it, out scaled by sigmoid(lse - sink)
    sink = torch.randn(at.heads, generator=g) * 2
    sink[0] = math.inf
    sinked = sharded_decode(K, q, l_mla, index_q, l_index, weights, lens, l_table, ctx.group, attn_sink=sink)
    assert torch.equal(sinked.lse, res.lse), "the sink leaves the lse as it was"
    kept = torch.sigmoid(torch.where(torch.isinf(ref_lse), 0.0, ref_lse) - sink.double())
    assert_close("sparse_decode.out", sinked.out.reshape(B * next_n, at.heads, at.v_dim), ref_out * kept[..., None])
    assert (sinked.out[..., 0, :] == 0).all(), "sink +inf: that head's out is 0"
    partial = sharded_decode(K, q, l_mla, index_q, l_index, weights, lens, l_table, ctx.group, merge=False)
    assert torch.equal(partial.slots, res.slots)
    local64 = dequantize_mla_rows(l_mla.reshape(-1, FMT.bytes_per_token), FMT)
    ref_out, ref_lse = reference.sparse_attention(q.reshape(B * next_n, at.heads, at.qk_dim), local64,
                                                  res.slots.reshape(B * next_n, k), at.softmax_scale, at.v_dim)
    assert_close("sparse_decode.out", partial.out.reshape(B * next_n, at.heads, at.v_dim), ref_out)
    assert_close("sparse_decode.lse", partial.lse.reshape(B * next_n, at.heads), ref_lse)


# -- training --------------------------------------------------------------------------------------

def selected_rows(gen, S, SKV, k):
    """Global indices with invalid entries mixed in, row 0 all invalid, the last kv rows selected
    by nobody (so the last shard's dkv is exactly 0 where nobody selects it)."""
    rows = []
    for t in range(S):
        n_valid = 0 if t == 0 else int(torch.randint(1, k + 1, (1,), generator=gen))
        valid = torch.randperm(SKV - 3, generator=gen)[:n_valid]
        bad = torch.tensor([-1, SKV, 2**31 - 1, -(2**31)])[torch.randint(0, 4, (k - n_valid,), generator=gen)]
        row = torch.cat([valid, bad])
        rows.append(row[torch.randperm(k, generator=gen)])
    return torch.stack(rows).int()


def scenario_training_attention(ctx: Rank):
    """Sequence split (uneven, an empty shard at world 3): out, lse, dq, dkv of every rank's shard
    against the float64 forward and backward of the whole sequence."""
    K = ctx.kernels["training"]
    at, g = K.spec.attention, ctx.gen
    S, k = 13, K.spec.topk.k
    seq = Sharding.contiguous(S, ctx.world, uneven_sizes(S, ctx.world, rank_empty=True))
    q = torch.randn(S, at.heads, at.qk_dim, generator=g).bfloat16()
    kv = torch.randn(S, at.qk_dim, generator=g).bfloat16()
    idx = selected_rows(g, S, S, k)
    d_out = torch.randn(S, at.heads, at.v_dim, generator=g).bfloat16()
    part = lambda x: seq.shard(x, ctx.rank)
    q_l, kv_l = part(q).clone().requires_grad_(), part(kv).clone().requires_grad_()
    out, lse = sharded_sparse_attention(K, q_l, kv_l, part(idx), seq, ctx.group)
    (out.float() * part(d_out).float()).sum().backward()
    out64, lse64 = reference.sparse_attention(q, kv, idx, at.softmax_scale, at.v_dim)
    dq64, dkv64 = reference.sparse_attention_bwd(q, kv, idx, out64, lse64, d_out, at.softmax_scale, at.v_dim)
    if seq.sizes[ctx.rank]:
        assert_close("sparse_attention.out", out, part(out64))
        assert_close("sparse_attention.lse", lse, part(lse64))
        assert_close("sparse_attention_bwd.dq", q_l.grad, part(dq64))
        assert_close("sparse_attention_bwd.dkv", kv_l.grad, part(dkv64))
    assert q_l.grad.shape == q_l.shape and kv_l.grad.shape == kv_l.shape


def scenario_training_indexer_loss(ctx: Rank):
    """The indexer loss with the sequence split: loss and d_iq, d_ik, d_weights of every shard
    against the float64 loss and backward of the whole sequence."""
    K = ctx.kernels["training"]
    ix, at, g = K.spec.indexer, K.spec.attention, ctx.gen
    S, k = 11, K.spec.topk.k
    seq = Sharding.contiguous(S, ctx.world, uneven_sizes(S, ctx.world, rank_empty=False))
    iq = torch.randn(S, ix.heads, ix.head_dim, generator=g).bfloat16()
    ik = torch.randn(S, ix.head_dim, generator=g).bfloat16()
    w = torch.randn(S, ix.heads, generator=g)
    aq = torch.randn(S, at.heads, at.qk_dim, generator=g).bfloat16()
    akv = torch.randn(S, at.qk_dim, generator=g).bfloat16()
    idx = selected_rows(g, S, S, k)
    _, alse64 = reference.sparse_attention(aq, akv, idx, at.softmax_scale, at.v_dim)
    alse = alse64.float()
    part = lambda x: seq.shard(x, ctx.rank)
    iq_l, ik_l, w_l = (part(x).clone().requires_grad_() for x in (iq, ik, w))
    loss, index_lse = sharded_indexer_loss(K, iq_l, ik_l, w_l, part(aq), part(akv), part(alse), part(idx), seq,
                                           ctx.group)
    loss.sum().backward()
    loss64, lse64 = reference.indexer_loss(iq, ik, w, aq, akv, alse, idx, at.softmax_scale)
    d_iq, d_ik, d_w = reference.indexer_loss_bwd(iq, ik, w, aq, akv, alse, idx, at.softmax_scale, lse64,
                                                 torch.ones(S, dtype=torch.float64))
    assert_close("indexer_loss.loss", loss, part(loss64))
    assert_close("indexer_loss.dq", iq_l.grad, part(d_iq))
    assert_close("indexer_loss.dk", ik_l.grad, part(d_ik))
    assert_close("indexer_loss.dweights", w_l.grad, part(d_w))


def scenario_refusals(ctx: Rank):
    """Layouts that do not fit the group or the tensors (on every rank) are refused, naming the
    argument, before any collective starts, so the group stays usable."""
    K = ctx.kernels["prefill"]
    ix = K.spec.indexer
    q, w = torch.zeros(4, ix.heads, ix.head_dim).bfloat16(), torch.zeros(4, ix.heads)
    keys = torch.zeros(10, ix.head_dim).bfloat16()
    ks = ke = torch.zeros(4, dtype=torch.int32)
    cases = [
        (lambda: key_sharded_select(K, q, keys, None, w, ks, ke, Sharding.round_robin(10, ctx.world + 1), ctx.group),
         f"sharding splits over {ctx.world + 1} ranks but the group has {ctx.world}"),
        (lambda: key_sharded_select(K, q, keys, None, w, ks, ke, Sharding.round_robin(11 * ctx.world, ctx.world),
                                    ctx.group), "index_k has 10 rows but this rank's shard is"),
        (lambda: row_sharded_select(K, q, keys, None, w, ks, ke, Sharding.round_robin(4, ctx.world), ctx.group),
         "rows must be a contiguous sharding"),
        (lambda: sharded_sparse_attention(K, q, keys, ks, Sharding.contiguous(5 * ctx.world, ctx.world),
                                          ctx.group), "q has 4 rows but this rank's shard is"),
    ]
    for call, message in cases:
        try:
            call()
        except ValueError as e:
            assert message in str(e), (message, str(e))
        else:
            raise AssertionError(f"not refused: {message}")


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


# ------------------------------------------------------------------------------------------------
# the rank processes

def build_kernels(backend):
    train = dsagen.load_spec(os.path.join(os.path.dirname(__file__), "..", "specs", "deepseek_v32_training.toml"))
    training = dataclasses.replace(
        train, attention=dataclasses.replace(train.attention, heads=3, qk_dim=40, v_dim=24),
        topk=dataclasses.replace(train.topk, k=6), indexer=dataclasses.replace(train.indexer, heads=2, head_dim=16))
    specs = {"prefill": prefill_spec(), "serving": serving_spec(), "training": training}
    return {name: dsagen.build(spec, backend=backend, deterministic=True) for name, spec in specs.items()}


def rank_main(rank: int, store_path: str, seed: int, backend: str, out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, RANKS), rank=rank, world_size=RANKS,
                            timeout=datetime.timedelta(seconds=120))
    groups = {w: dist.new_group(list(range(w))) for w in WORLDS if w < RANKS}
    groups[RANKS] = None
    kernels = build_kernels(backend)
    verdicts = {}
    for name, scenario in SCENARIOS.items():
        for world in WORLDS:
            if rank < world:
                gen = torch.Generator().manual_seed(seed * 1000 + world * 100 + sorted(SCENARIOS).index(name))
                try:
                    scenario(Rank(rank, world, groups[world], gen, kernels))
                    verdicts[f"{name}-W{world}"] = "ok"
                except Exception:
                    verdicts[f"{name}-W{world}"] = f"rank {rank}: {traceback.format_exc()}"
            dist.barrier()
    with open(out_path, "w") as f:
        json.dump(verdicts, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory, child_env):
    """Start the rank processes once; (scenario-W{world}) -> "ok" or what failed, over the ranks."""
    from dsagen.backends.tvm import available

    backend = "tvm" if available() is None else "triton"
    seed = int(os.environ.get("DSAGEN_TEST_SEED") or int.from_bytes(os.urandom(3), "little"))
    print(f"random seed {seed} (rerun with DSAGEN_TEST_SEED={seed}), backend {backend}")
    tmp = tmp_path_factory.mktemp("dist")
    env = {**child_env, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(r), str(tmp / "store"), str(seed),
                               backend, str(tmp / f"rank{r}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(RANKS)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            logs.append("timed out after 600 s")
    merged = {}
    for r in range(RANKS):
        path = tmp / f"rank{r}.json"
        if not path.exists():
            return {"error": f"rank {r} wrote no verdicts (exit {procs[r].returncode}):\n{logs[r][-4000:]}"}
        for key, verdict in json.loads(path.read_text()).items():
            if verdict != "ok" or key not in merged:
                merged[key] = verdict if merged.get(key, "ok") == "ok" else merged[key]
    return merged


@pytest.mark.parametrize("world", WORLDS, ids=[f"W{w}" for w in WORLDS])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_distributed(verdicts, scenario, world):
    if "error" in verdicts:
        pytest.fail(verdicts["error"])
    verdict = verdicts.get(f"{scenario}-W{world}", "no verdict")
    if verdict != "ok":
        pytest.fail(verdict)


# ------------------------------------------------------------------------------------------------
# no process group

def canonical_topk(row: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k best values of one row: NaN first, ties (and -0 / +0) to the lower one."""
    nan = torch.isnan(row)
    plain = torch.where(nan, torch.zeros_like(row), row) + 0.0
    order = torch.sort(plain, descending=True, stable=True).indices
    order = order[torch.sort(nan[order].to(torch.int8), descending=True, stable=True).indices]
    return order[:k]


def test_ordered_image_ranks_nan_above_inf_and_ties_zeros():
    nan = torch.tensor([math.nan])
    neg_nan = (-nan).view(torch.int32) | torch.tensor([-(2**31)], dtype=torch.int32)
    values = torch.tensor([-math.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3e38, math.inf])
    values = torch.cat([values, nan, neg_nan.view(torch.float32)])
    image = ordered_image(values)
    rising = torch.cat([image[:5], image[6:10]])  # -0 and +0 share one image
    assert (rising[1:] > rising[:-1]).all() and image[4] == image[5]
    assert image[10] == image[11] > image[9], "every NaN ties, above +inf"
    assert image.min() >= 0 and image.max() < 2**32


@pytest.mark.parametrize("kind", ["contiguous", "round_robin"])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_merging_local_topks_gives_the_global_topk(gen, kind, world):
    """Plain torch: per rank the canonical top-k of its keys' values, merged by selection keys,
    equals the canonical top-k of the whole row, under heavy ties, NaN, +-inf and +-0."""
    k, n = 6, 29
    pool = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, 2.0, -1.0])
    rows = pool[torch.randint(0, len(pool), (12, n), generator=gen)]
    rows[0] = 1.0
    sizes = None if kind == "round_robin" else [n - (world - 1) * (n // (world + 1))] + [n // (world + 1)] * (world - 1)
    keys_layout = Sharding.round_robin(n, world) if kind == "round_robin" else Sharding.contiguous(n, world, sizes)
    for row in rows:
        candidates = []
        for r in range(world):
            local = keys_layout.shard(row, r)
            pos = canonical_topk(local, k)
            candidates.append(selection_keys(local[pos], keys_layout.to_global(pos, r)))
        merged = merge_topk(torch.cat(candidates)[None], k)[0]
        want = canonical_topk(row, k)
        assert torch.equal(merged[:want.numel()].long(), want), (row, merged, want)


def test_sharding_maps_windows_and_positions():
    """Every layout: local windows hold exactly the global window's rows; owner / to_local /
    to_global round-trip; -1 stays -1."""
    total = 23
    for layout in (Sharding.contiguous(total, 4, (5, 0, 11, 7)), Sharding.round_robin(total, 4),
                   Sharding.contiguous(total, 3)):
        g = torch.arange(total)
        for r in range(layout.world):
            local = torch.arange(layout.sizes[r])
            glob = layout.to_global(local, r)
            assert torch.equal(layout.shard(g, r), glob)
            assert (layout.owner(glob) == r).all() and torch.equal(layout.to_local(glob), local)
            ks = torch.tensor([-4, 0, 3, 9, 20, 22, 15], dtype=torch.int32)
            ke = torch.tensor([30, 0, 17, 9, 23, 10, 16], dtype=torch.int32)
            lo, hi = layout.local_window(ks, ke, r)
            for t in range(ks.numel()):
                a, b = reference.window(ks, ke, total, t)
                want = [p for p in range(layout.sizes[r]) if a <= int(glob[p]) < b]
                assert list(range(int(lo[t]), int(hi[t]))) == want
        assert (layout.owner(torch.tensor([-1])) == -1).all() and (layout.to_local(torch.tensor([-1])) == -1).all()


@pytest.mark.parametrize("bad,match", [
    (lambda: Sharding.contiguous(10, 3, (4, 4, 4)), "sum to 12, not total=10"),
    (lambda: Sharding.contiguous(10, 2, (4, 3, 3)), "3 entries but world is 2"),
    (lambda: Sharding.contiguous(10, 0), "world must be an integer >= 1"),
    (lambda: Sharding("diagonal", (1,)), "kind must be one of contiguous, round_robin"),
    (lambda: Sharding("round_robin", (2, 4)), r"are \(3, 3\), got \(2, 4\)"),
    (lambda: Sharding.contiguous(5, 2).shard(torch.zeros(5), 2), r"rank must be in \[0, 2\)"),
], ids=["sum", "count", "world", "kind", "rr-sizes", "rank"])
def test_sharding_refuses_bad_layouts(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_collectives_need_an_initialized_process_group():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="needs torch.distributed initialized"):
        row_sharded_select(None, torch.zeros(1), None, None, None, None, None, Sharding.contiguous(1, 1))


def partial_rows(gen, idx: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """Split each row's indices into `parts` disjoint subsets (-1 elsewhere); the last part of row
    0 keeps nothing, so one partial of it has no mass."""
    owner = torch.randint(0, parts, idx.shape, generator=gen)
    owner[0] = 0
    return [torch.where(owner == p, idx, -1) for p in range(parts)]


def test_merge_attention_of_disjoint_partials_matches_float64(gen, device):
    """Partials from the generated sparse attention over disjoint subsets of each row's keys
    (some with no valid key: lse +inf), merged, against float64 attention over the union; a row
    with no key anywhere gives out 0 and lse +inf."""
    spec = prefill_spec()
    K = dsagen.build(spec)
    at = spec.attention
    S, SKV, k = 6, 40, spec.topk.k
    q = torch.randn(S, at.heads, at.qk_dim, generator=gen).bfloat16().to(device)
    kv = torch.randn(SKV, at.qk_dim, generator=gen).bfloat16().to(device)
    idx = torch.stack([torch.randperm(SKV, generator=gen)[:k] for _ in range(S)]).int()
    idx[5] = -1  # no key at all
    parts = [K.sparse_attention(q, kv, p.to(device)) for p in partial_rows(gen, idx, 3)]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_out, ref_lse = reference.sparse_attention(q.cpu(), kv.cpu(), idx, at.softmax_scale, at.v_dim)
    assert_close("sparse_attention.out", out, ref_out)
    assert_close("sparse_attention.lse", lse, ref_lse)
    assert (lse[5] == math.inf).all() and (out[5] == 0).all()


def test_merge_attention_conventions():
    """+inf partials carry no mass (even a NaN out beside them); a NaN lse makes its (query, head)
    NaN; a lone partial comes back unchanged; shapes and dtypes are checked."""
    out = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]], [[math.nan, math.nan]]])  # [P=3, 1, Dv=2]
    lse = torch.tensor([[0.0], [math.log(3.0)], [math.inf]])
    merged, m_lse = merge_attention(out, lse)
    assert torch.allclose(merged, torch.tensor([[2.5, 3.5]])) and torch.allclose(m_lse, torch.tensor([math.log(4.0)]))
    nan_out, nan_lse = merge_attention(out[:2], torch.tensor([[0.0], [math.nan]]))
    assert torch.isnan(nan_out).all() and torch.isnan(nan_lse).all()
    none_out, none_lse = merge_attention(torch.zeros(2, 1, 2), torch.full((2, 1), math.inf))
    assert (none_out == 0).all() and (none_lse == math.inf).all()
    one_out, one_lse = merge_attention(out[:1], lse[:1])
    assert torch.equal(one_out, out[0]) and torch.equal(one_lse, lse[0])
    with pytest.raises(ValueError, match="must agree on"):
        merge_attention(out, lse[:, :, None])
    with pytest.raises(ValueError, match="at least one partial"):
        merge_attention([], [])


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
