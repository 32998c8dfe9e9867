"""dsagen.distributed on a process group of one rank: every entry point is the plain kernels.

On one rank nothing is sharded, so each entry point must run the kernels the single-process path
runs (dsa()'s selection, dsa(), decode(), sparse_attention and indexer_loss with their backward),
in the same order, on the same tensors, and no other torch op beyond what its result needs: no
gather, merge or mask. Each test logs every op dispatched (TorchDispatchMode: the kernels as the
dsagen:: ops, the glue as aten:: ops, forward and backward) for the plain path and the
distributed one on the same inputs, and compares both the logs and the results, bitwise.

The process group is real: gloo on this process (any device, no collective runs), and NCCL on a
CUDA GPU (the `nccl` tests; benchmarks/distributed_gpu.sh runs them with `-k nccl`).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsagen.distributed import (Sharding, count_wire_bytes, key_sharded_attention, key_sharded_select,
                                row_sharded_select, sharded_decode, sharded_decode_select, sharded_indexer_loss,
                                sharded_sparse_attention)
from test_distributed import PagedTokens, Rank, build_kernels, paged_caches, prefill_inputs, selected_rows


class OpLog(TorchDispatchMode):
    """The name of every op dispatched while active (ops inside a kernel are not seen)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


def logged(fn):
    """(fn's result, the ops it dispatched), with no byte on the wire. A first call warms up (it
    resolves, compiles and loads, and may keep what it made alive), a second one is logged."""
    fn()
    with count_wire_bytes() as wire, OpLog() as log:
        result = fn()
    assert wire.collectives == 0 and wire.received == 0, wire
    return result, log.ops


def assert_same_work(distributed: list[str], plain: list[str], extra: tuple[str, ...] = ()):
    """The distributed path dispatched the plain path's ops, in order, plus only `extra`."""
    rest = list(distributed)
    for op in extra:
        assert op in rest, (op, distributed)
        rest.remove(op)
    assert rest == plain, f"one rank runs {distributed}, the plain path {plain}"


def assert_equal(*pairs):
    for name, got, want in pairs:
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype)
        assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan()), name


# ------------------------------------------------------------------------------------------------
# a real process group of one rank

GROUPS = ["gloo", "nccl"]


@pytest.fixture(scope="module", params=GROUPS)
def one_rank(request, tmp_path_factory, device):
    """torch.distributed initialized on this process with world size 1; the device its tensors use."""
    import torch.distributed as dist

    backend = request.param
    if backend == "nccl":
        if not torch.cuda.is_available():
            pytest.skip("nccl: needs a CUDA GPU, torch sees none")
        if not dist.is_nccl_available():
            pytest.skip("nccl: this torch build has no NCCL")
        device = torch.device("cuda", torch.cuda.current_device())
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("one-rank") / "store"), 1)
    options = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=0, world_size=1, **options)
    try:
        assert dist.get_world_size() == 1
        yield device
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def kernels(one_rank):
    """Deterministic builds (one schedule per kernel) of the small training and serving specs."""
    from dsagen.backends.tvm import available

    backend = "tvm" if one_rank.type == "cpu" and available() is None else "triton"
    return build_kernels(backend)


def on(device, *xs):
    return tuple(x.to(device) for x in xs)


# ------------------------------------------------------------------------------------------------

def prefill_case(gen, K, device):
    """Index inputs with mixed windows (empty, inverted, past the keys, shorter than k) and the
    attention's q, kv of the same keys."""
    S, SKV = 9, 50
    q, key, k_scale, w, ks, ke = prefill_inputs(Rank(0, 1, None, gen, {"prefill": K}), S, SKV, ties=False)
    at = K.spec.attention
    aq = torch.randn(S, at.heads, at.qk_dim, generator=gen).bfloat16()
    kv = torch.randn(SKV, at.qk_dim, generator=gen).bfloat16()
    return on(device, q, key, k_scale, w, ks, ke, aq, kv)


def test_one_rank_row_selection_is_the_plain_selection(one_rank, kernels, gen):
    """row_sharded_select runs the indexer and the top-k and nothing else: the gathered table is
    the rank's own."""
    K = kernels["training"]
    q, key, k_scale, w, ks, ke, _, _ = prefill_case(gen, K, one_rank)
    rows = Sharding.contiguous(q.shape[0], 1)
    sel, ops = logged(lambda: row_sharded_select(K, q, key, k_scale, w, ks, ke, rows))
    plain, plain_ops = logged(lambda: K.topk(K.indexer(q, key, k_scale, w, ks, ke), ks, ke))
    assert_same_work(ops, plain_ops)
    assert_equal(("indices", sel.indices, plain), ("local", sel.local, plain))


def test_one_rank_key_selection_and_attention_are_dsa(one_rank, kernels, gen):
    """key_sharded_select + key_sharded_attention over every key (round robin and contiguous of
    one rank) run dsa()'s kernels, plus one clamp for the owner field: no merge, no LSE merge."""
    K = kernels["training"]
    q, key, k_scale, w, ks, ke, aq, kv = prefill_case(gen, K, one_rank)
    plain, plain_ops = logged(lambda: K.dsa(aq, kv, q, key, k_scale, w, ks, ke))
    for keys in (Sharding.round_robin(key.shape[0], 1), Sharding.contiguous(key.shape[0], 1)):
        key_0, scale_0, kv_0 = (keys.shard(x, 0) for x in (key, k_scale, kv))

        def step():
            sel = key_sharded_select(K, q, key_0, scale_0, w, ks, ke, keys)
            return sel, key_sharded_attention(K, aq, kv_0, sel.mine)
        (sel, (out, lse)), ops = logged(step)
        assert_same_work(ops, plain_ops, extra=("aten::clamp_max",))
        assert_equal(("indices", sel.indices, plain.indices), ("mine", sel.mine, plain.indices),
                     ("local", sel.local, plain.indices), ("out", out, plain.out), ("lse", lse, plain.lse))
        assert torch.equal(sel.owner, torch.where(plain.indices >= 0, 0, -1).int())


def decode_case(gen, K, device):
    """Requests of 37, 1, 6 and 23 tokens (fewer than k, a row that sees nothing), next_n 2, in
    shuffled pages with NaN bytes past every context."""
    spec = K.spec
    ix, at = spec.indexer, spec.attention
    contexts, next_n = [37, 1, 6, 23], 2
    B = len(contexts)
    tokens = PagedTokens(gen, spec, contexts)
    q = torch.randn(B, next_n, at.heads, at.qk_dim, generator=gen).bfloat16()
    index_q = (torch.randn(B, next_n, ix.heads, ix.head_dim, generator=gen) * 8).to(torch.float8_e4m3fn)
    weights = torch.randn(B * next_n, ix.heads, generator=gen)
    index_cache, mla_cache, table = paged_caches(gen, tokens, spec.cache.page_size)
    lens = torch.tensor(contexts, dtype=torch.int32)
    return on(device, q, mla_cache, index_q, index_cache, weights, lens, table)


def test_one_rank_decode_is_the_plain_decode_step(one_rank, kernels, gen):
    """sharded_decode(positions=False) is decode() itself; with positions it runs the same three
    kernels on the same slots (the top-k through an identity table, a torch map to slots)."""
    K = kernels["serving"]
    q, mla_cache, index_q, index_cache, weights, lens, table = case = decode_case(gen, K, one_rank)
    plain, plain_ops = logged(lambda: K.decode(*case))
    step, ops = logged(lambda: sharded_decode(K, *case, positions=False))
    assert_same_work(ops, plain_ops)
    assert step.positions is None
    assert_equal(("out", step.out, plain.out), ("lse", step.lse, plain.lse), ("slots", step.slots, plain.slots))
    assert (step.lse[1, 0] == math.inf).all() and (step.out[1, 0] == 0).all()

    full, ops = logged(lambda: sharded_decode(K, *case))
    kernels_run = [op for op in ops if op.startswith("dsagen::")]
    assert kernels_run == [op for op in plain_ops if op.startswith("dsagen::")], kernels_run
    assert_equal(("out", full.out, plain.out), ("lse", full.lse, plain.lse), ("slots", full.slots, plain.slots))
    width = table.shape[1]
    identity = torch.arange(width, dtype=torch.int32, device=table.device).expand(table.shape[0], width)
    logits = K.paged_indexer(index_q, index_cache, weights, lens, table)
    want = K.decode_topk(logits, lens, identity.contiguous()).reshape(full.positions.shape)
    assert_equal(("positions", full.positions, want))
    positions, slots = sharded_decode_select(K, index_q, index_cache, weights, lens, table)
    assert_equal(("positions", positions, want), ("slots", slots, plain.slots))

    # a sink on one rank: the decode kernel applies it, with no merge launched
    sink = torch.tensor([math.inf] + [0.5] * (K.spec.attention.heads - 1), device=q.device)
    sinked, ops = logged(lambda: sharded_decode(K, *case, attn_sink=sink))
    assert not [op for op in ops if "lse_merge" in op], ops
    want_out, want_lse = K.sparse_decode(q, mla_cache, plain.slots, None, sink)
    assert_equal(("out", sinked.out, want_out), ("lse", sinked.lse, plain.lse))


def test_one_rank_training_is_the_plain_forward_and_backward(one_rank, kernels, gen):
    """sharded_sparse_attention and sharded_indexer_loss, forward and backward, dispatch what the
    plain kernels do (no gather, no reduce-scatter, no autograd Function of their own), and give
    the same outputs and gradients bitwise."""
    K = kernels["training"]
    ix, at, S, k = K.spec.indexer, K.spec.attention, 11, K.spec.topk.k
    seq = Sharding.contiguous(S, 1)
    q, kv = torch.randn(S, at.heads, at.qk_dim, generator=gen), torch.randn(S, at.qk_dim, generator=gen)
    iq, ik = torch.randn(S, ix.heads, ix.head_dim, generator=gen), torch.randn(S, ix.head_dim, generator=gen)
    w = torch.randn(S, ix.heads, generator=gen)
    d_out = torch.randn(S, at.heads, at.v_dim, generator=gen).bfloat16()
    idx = selected_rows(gen, S, S, k)
    q, kv, iq, ik, w, d_out, idx = on(one_rank, q.bfloat16(), kv.bfloat16(), iq.bfloat16(), ik.bfloat16(), w,
                                      d_out, idx)

    def run(attention, indexer_loss):
        leaves = [x.clone().requires_grad_() for x in (q, kv, iq, ik, w)]
        aq, akv, iq_, ik_, w_ = leaves
        out, lse = attention(aq, akv)
        loss, index_lse = indexer_loss(iq_, ik_, w_, aq.detach(), akv.detach(), lse.detach())
        ((out.float() * d_out.float()).sum() + loss.sum()).backward()
        return [out, lse, loss, index_lse] + [x.grad for x in leaves]

    plain, plain_ops = logged(lambda: run(
        lambda aq, akv: K.sparse_attention(aq, akv, idx),
        lambda iq_, ik_, w_, aq, akv, lse: K.indexer_loss(iq_, ik_, w_, aq, akv, lse, idx)))
    dist, ops = logged(lambda: run(
        lambda aq, akv: sharded_sparse_attention(K, aq, akv, idx, seq),
        lambda iq_, ik_, w_, aq, akv, lse: sharded_indexer_loss(K, iq_, ik_, w_, aq, akv, lse, idx, seq)))
    assert_same_work(ops, plain_ops)
    names = ["out", "lse", "loss", "index_lse", "dq", "dkv", "d_iq", "d_ik", "d_weights"]
    assert_equal(*zip(names, dist, plain))
