"""The sparse attention backward with the forward's attention sink and per-row top-k lengths, on
both backends, against torch.autograd of a float64 forward written from the math.

Odd shapes (3 or 10 heads, k = 37 or 5), sinks of +inf, -inf, 0 and random values, lengths of 0,
negative, past k, exactly k and in between, every kind of invalid index, poisoned outputs; the
sink's gradient; a NaN sink; the deterministic build; autograd through kernels.sparse_attention;
bad arguments named in the error; the new Triton specializations compiled for sm_90."""
from __future__ import annotations

import math
import types

import pytest
import torch

import dsagen
from dsagen.ops import get_op
from dsagen.verify import assert_close
from dsagen.workloads import workload

BAD = (-(2**31), -1)  # plus SKV and 2**31 - 1, which depend on the problem


def make_spec(k, heads, qk_dim, v_dim):
    return dsagen.Spec(topk=dsagen.TopKSpec(k=k), attention=dsagen.AttentionSpec(heads=heads, qk_dim=qk_dim,
                                                                                 v_dim=v_dim))


def forward64(q, kv, indices, sm_scale, v_dim, sink, lengths):
    """out [S, H, v_dim] float64, differentiable in q, kv and sink: per row, the softmax over the
    valid indices among its first lengths[t] slots (none for a length <= 0), times
    sigma = sigmoid(lse - sink) per head; a row with no valid index gives out 0."""
    n_tokens, heads, _ = q.shape
    skv, k = kv.shape[0], indices.shape[1]
    rows_out = []
    for t in range(n_tokens):
        n = k if lengths is None else min(max(int(lengths[t]), 0), k)
        idx = indices[t, :n].long()
        idx = idx[(idx >= 0) & (idx < skv)]
        if idx.numel() == 0:
            rows_out.append(q.new_zeros(heads, v_dim))
            continue
        rows = kv[idx]
        scores = sm_scale * (q[t] @ rows.T)
        lse = torch.logsumexp(scores, -1)
        out = torch.softmax(scores, -1) @ rows[:, :v_dim]
        if sink is not None:
            out = out * torch.sigmoid(lse - sink)[:, None]
        rows_out.append(out)
    return torch.stack(rows_out)


def lse64(q, kv, indices, sm_scale, lengths):
    """The forward's lse (no sink in it), float64: +inf for a row with no valid index."""
    with torch.no_grad():
        n_tokens, heads, _ = q.shape
        skv, k = kv.shape[0], indices.shape[1]
        lse = torch.full((n_tokens, heads), math.inf, dtype=torch.float64)
        for t in range(n_tokens):
            n = k if lengths is None else min(max(int(lengths[t]), 0), k)
            idx = indices[t, :n].long()
            idx = idx[(idx >= 0) & (idx < skv)]
            if idx.numel():
                lse[t] = torch.logsumexp(sm_scale * (q[t] @ kv[idx].T), -1)
        return lse


def sinks(gen, heads):
    """+inf, -inf and 0 first, then random values around a row's lse (sigma neither 0 nor 1)."""
    fixed = torch.tensor([math.inf, -math.inf, 0.0])
    return torch.cat([fixed, torch.rand(max(heads - 3, 0), generator=gen) * 6 - 2])[:heads]


def lengths_for(gen, n_tokens, k):
    """0, negative, past k, exactly k, then random lengths from 1 to k."""
    fixed = torch.tensor([0, -3, k + 5, k, 2**31 - 1, -(2**31)])
    rand = torch.randint(1, k + 1, (max(n_tokens - len(fixed), 0),), generator=gen)
    return torch.cat([fixed, rand])[:n_tokens].int()


def indices_for(gen, n_tokens, skv, k):
    """Random rows (duplicates possible) with every invalid kind mixed in; the last row all invalid;
    the last kv row selected by nobody."""
    bad = torch.tensor([*BAD, skv, 2**31 - 1])
    idx = torch.randint(0, skv - 1, (n_tokens, k), generator=gen)
    invalid = torch.rand(n_tokens, k, generator=gen) < 0.3
    idx = torch.where(invalid, bad[torch.randint(0, 4, (n_tokens, k), generator=gen)], idx)
    idx[-1] = bad[torch.randint(0, 4, (k,), generator=gen)]
    return idx.int()


class Case:
    """One problem: bf16 inputs, the forward's saved out (bf16) and lse (fp32), d_out, and the
    float64 gradients of forward64 (dq, dkv, dsink)."""

    def __init__(self, spec, gen, n_tokens, skv, sink=True, lengths=True, sm_scale=0.15):
        at, k = spec.attention, spec.topk.k
        self.spec, self.scale = spec, sm_scale
        self.q = torch.randn(n_tokens, at.heads, at.qk_dim, generator=gen).bfloat16()
        self.kv = torch.randn(skv, at.qk_dim, generator=gen).bfloat16()
        self.idx = indices_for(gen, n_tokens, skv, k)
        self.sink = sinks(gen, at.heads) if sink else None
        self.lengths = lengths_for(gen, n_tokens, k) if lengths else None
        self.d_out = torch.randn(n_tokens, at.heads, at.v_dim, generator=gen).bfloat16()
        q64 = self.q.double().requires_grad_()
        kv64 = self.kv.double().requires_grad_()
        leaves = [q64, kv64]
        sink64 = None
        if sink:
            sink64 = self.sink.double().requires_grad_()
            leaves.append(sink64)
        out = forward64(q64, kv64, self.idx, sm_scale, at.v_dim, sink64, self.lengths)
        self.grads = torch.autograd.grad(out, leaves, self.d_out.double(), allow_unused=True)
        self.out64 = out.detach()
        self.lse64 = lse64(q64.detach(), kv64.detach(), self.idx, sm_scale, self.lengths)
        self.out, self.lse = self.out64.bfloat16(), self.lse64.float()

    def args(self, device):
        tensors = (self.q, self.kv, self.idx, self.out, self.lse, self.d_out)
        extra = (self.sink, self.lengths)
        return (*(t.to(device) for t in tensors), self.scale, *(None if t is None else t.to(device) for t in extra))

    def live_rows(self):
        """[S] bool: rows with a valid index within their length."""
        return torch.isfinite(self.lse[:, 0])

    def selected_kv(self):
        """[SKV] bool: kv rows some row selects within its length."""
        k = self.idx.shape[1]
        n = torch.full((self.idx.shape[0],), k) if self.lengths is None else self.lengths.long().clamp(0, k)
        live = torch.arange(k)[None, :] < n[:, None]
        flat = self.idx.long()[live]
        used = torch.zeros(self.kv.shape[0], dtype=torch.bool)
        used[flat[(flat >= 0) & (flat < self.kv.shape[0])]] = True
        return used


def poisoned(spec, case, device):
    bufs = workload("sparse_attention_bwd").poisoned_outputs(spec, case.args(device))
    return bufs | {"dsink": torch.full((spec.attention.heads,), math.nan, device=device)}


def check_against_reference(case, dq, dkv, dsink=None):
    ref_dq, ref_dkv, *ref_dsink = case.grads
    assert_close("sparse_attention_bwd.dq", dq, ref_dq)
    assert_close("sparse_attention_bwd.dkv", dkv, ref_dkv)
    assert torch.all(dq.cpu()[~case.live_rows()] == 0), "a row with no valid index within its length has dq 0"
    used = case.selected_kv()
    assert not used.all() and torch.all(dkv.cpu()[~used] == 0), "kv rows nobody selects have dkv exactly 0"
    if dsink is not None:
        check_dsink(case, dsink, ref_dsink[0])
        infinite = torch.isinf(case.sink)
        assert torch.all(dsink.cpu()[infinite] == 0), "a sink of +inf or -inf has gradient 0"
        plus_inf = case.sink == math.inf
        assert torch.all(dq.cpu()[:, plus_inf] == 0), "a head whose sink is +inf (out 0) has dq 0"


def check_dsink(case, dsink, ref_dsink):
    """dsink sums -(1 - sigma) Delta over rows, and Delta = d_out . out cancels: the saved out's bf16
    rounding (2^-9 relative) then moves dsink by up to 2^-9 sum_t (1 - sigma) sum_d |d_out out| (twice
    that here, for the fp32 sums), which may be large next to dsink itself. Checked elementwise
    against that bound from the float64 gradient, and tightly against the formula on the saved out."""
    lse, sink = case.lse.double(), case.sink.double()[None, :]
    sink_weight = torch.where(lse == math.inf, 0.0, torch.sigmoid(sink - lse))
    spread = (sink_weight * (case.d_out.double() * case.out.double()).abs().sum(-1)).sum(0)
    err = (dsink.detach().cpu().double() - ref_dsink).abs()
    assert (err <= 2**-8 * spread + 1e-6).all(), f"dsink {dsink.tolist()} != float64 {ref_dsink.tolist()}"
    formula = workload("sparse_attention_bwd").reference(case.spec, *case.args("cpu"))[2]
    assert_close("sparse_attention_bwd.dsink", dsink, formula, 1e-5)


SHAPES = [
    # S, SKV, heads, qk_dim, v_dim, k
    (8, 53, 3, 80, 48, 37),
    (7, 23, 10, 48, 48, 5),  # no rope part
]


@pytest.mark.parametrize("S,SKV,H,DQK,DV,K", SHAPES, ids=[f"S{s[0]}-SKV{s[1]}-H{s[2]}-K{s[5]}" for s in SHAPES])
def test_sink_and_lengths_match_the_float64_gradients(device, backend, gen, S, SKV, H, DQK, DV, K):
    spec = make_spec(K, H, DQK, DV)
    kernels = dsagen.build(spec, backend=backend)
    case = Case(spec, torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen))), S, SKV)
    bufs = poisoned(spec, case, device)
    dq, dkv = kernels.sparse_attention_bwd(*case.args(device), **bufs)
    assert dq.data_ptr() == bufs["dq"].data_ptr() and dkv.data_ptr() == bufs["dkv"].data_ptr()
    check_against_reference(case, dq, dkv, bufs["dsink"])


@pytest.mark.parametrize("sink,lengths", [(True, False), (False, True)], ids=["sink-only", "lengths-only"])
def test_each_input_alone(device, backend, gen, sink, lengths):
    spec = make_spec(37, 3, 80, 48)
    kernels = dsagen.build(spec, backend=backend)
    case = Case(spec, torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen))), 6, 41,
                sink=sink, lengths=lengths)
    bufs = poisoned(spec, case, device)
    if not sink:
        del bufs["dsink"]
    dq, dkv = kernels.sparse_attention_bwd(*case.args(device), **bufs)
    check_against_reference(case, dq, dkv, bufs.get("dsink"))


def test_a_sink_without_a_dsink_buffer_gives_the_same_dq_and_dkv(device, backend, gen):
    spec = make_spec(5, 10, 48, 48)
    kernels = dsagen.build(spec, backend=backend)
    case = Case(spec, torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen))), 5, 19)
    dq, dkv = kernels.sparse_attention_bwd(*case.args(device))
    check_against_reference(case, dq, dkv)


@pytest.mark.parametrize("deterministic", [False, True], ids=["plain", "deterministic"])
def test_a_nan_sink_reaches_its_head(device, backend, gen, deterministic):
    """A NaN sink makes that head's dsink NaN, its dq NaN on every row with a valid index and the
    dkv rows those select NaN; the other heads' dsink stay as they were."""
    spec = make_spec(5, 10, 48, 48)
    kernels = dsagen.build(spec, backend=backend, deterministic=deterministic)
    case = Case(spec, torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen))), 6, 19)
    case.sink[4] = math.nan
    dsink = torch.full((10,), math.nan, device=device)
    dsink_ok = torch.full((10,), 0.0, device=device)
    dq, dkv = kernels.sparse_attention_bwd(*case.args(device), dsink=dsink)
    assert torch.isnan(dsink[4])
    live, used = case.live_rows(), case.selected_kv()
    assert live.any() and torch.isnan(dq.cpu()[live, 4]).all()
    assert torch.isnan(dkv.cpu()[used]).all() and torch.all(dkv.cpu()[~used] == 0)
    case.sink[4] = 0.0
    kernels.sparse_attention_bwd(*case.args(device), dsink=dsink_ok)
    others = torch.arange(10) != 4
    assert torch.equal(dsink.cpu()[others], dsink_ok.cpu()[others])


def test_deterministic_build_gives_the_same_bytes_with_sink_and_lengths(device, backend, gen):
    spec = make_spec(37, 3, 80, 48)
    kernels = dsagen.build(spec, backend=backend, deterministic=True)
    case = Case(spec, torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen))), 8, 53)
    first = poisoned(spec, case, device)
    second = poisoned(spec, case, device)
    kernels.sparse_attention_bwd(*case.args(device), **first)
    kernels.sparse_attention_bwd(*case.args(device), **second)
    for name in ("dq", "dkv", "dsink"):
        a, b = first[name], second[name]
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a.view(torch.int32),
                           b.view(torch.int16) if b.dtype == torch.bfloat16 else b.view(torch.int32)), name
    check_against_reference(case, first["dq"], first["dkv"], first["dsink"])


def test_autograd_reaches_q_kv_and_the_sink(device, backend, gen):
    """kernels.sparse_attention with a sink and lengths: out's gradient reaches q, kv and attn_sink,
    as the backward kernel gives them from the forward's saved out and lse (dq and dkv also against
    the float64 gradients; dsink's own check against them is above)."""
    spec = make_spec(37, 3, 80, 48)
    kernels = dsagen.build(spec, backend=backend, deterministic=True)  # the same bits on every run
    case = Case(spec, torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen))), 8, 53,
                sm_scale=spec.attention.softmax_scale)
    q, kv, idx, _, _, d_out, _, sink, lengths = case.args(device)
    leaves = [x.clone().requires_grad_() for x in (q, kv, sink)]
    out, lse = kernels.sparse_attention(leaves[0], leaves[1], idx, None, leaves[2], lengths)
    out.backward(d_out)
    dsink = torch.full_like(sink, math.nan)
    direct = kernels.sparse_attention_bwd(q, kv, idx, out.detach(), lse, d_out, None, sink, lengths, dsink=dsink)
    for name, leaf, want in zip(("q", "kv", "attn_sink"), leaves, (*direct, dsink)):
        assert torch.equal(leaf.grad, want), name
    assert_close("sparse_attention_bwd.dq", leaves[0].grad, case.grads[0])
    assert_close("sparse_attention_bwd.dkv", leaves[1].grad, case.grads[1])
    # a sink that does not train: q still gets its gradient, the sink none
    q_leaf = q.clone().requires_grad_()
    out, _ = kernels.sparse_attention(q_leaf, kv, idx, None, sink, lengths)
    out.backward(d_out)
    assert torch.equal(q_leaf.grad, leaves[0].grad) and sink.grad is None


def test_compiled_backward_with_a_sink_equals_eager(device, gen):
    """torch.compile(fullgraph=True) traces the backward's dsink buffer (dsagen::sparse_attention_bwd_out)."""
    spec = make_spec(5, 3, 80, 48)
    kernels = dsagen.build(spec, deterministic=True)  # dkv's sums then do not depend on the launch order
    case = Case(spec, torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen))), 6, 19)
    q, kv, idx, *_, sink, lengths = case.args(device)

    def forward(q, kv, sink):
        out, _ = kernels.sparse_attention(q, kv, idx, None, sink, lengths)
        return out.float().square().mean()

    def fresh():
        return [x.detach().clone().requires_grad_() for x in (q, kv, sink)]

    eager_leaves, compiled_leaves = fresh(), fresh()
    forward(*eager_leaves).backward()
    torch._dynamo.reset()
    torch.compile(forward, fullgraph=True, backend="aot_eager")(*compiled_leaves).backward()
    for name, a, b in zip(("q", "kv", "attn_sink"), eager_leaves, compiled_leaves):
        assert a.grad is not None and torch.equal(a.grad, b.grad), name


def test_bad_arguments_name_the_argument(device):
    kernels = dsagen.build(make_spec(7, 3, 80, 48))
    bf, i32, f32 = torch.bfloat16, torch.int32, torch.float32
    S, SKV = 4, 10
    base = [torch.zeros(S, 3, 80, dtype=bf), torch.zeros(SKV, 80, dtype=bf), torch.zeros(S, 7, dtype=i32),
            torch.zeros(S, 3, 48, dtype=bf), torch.zeros(S, 3, dtype=f32), torch.zeros(S, 3, 48, dtype=bf)]
    base = [t.to(device) for t in base]
    sink = torch.zeros(3, dtype=f32, device=device)
    cases = [
        ("attn_sink", dict(attn_sink=torch.zeros(3, dtype=bf, device=device))),
        ("attn_sink", dict(attn_sink=torch.zeros(4, dtype=f32, device=device))),
        ("topk_length", dict(topk_length=torch.zeros(S, dtype=torch.int64, device=device))),
        ("topk_length", dict(topk_length=torch.zeros(S + 1, dtype=i32, device=device))),
        ("dsink", dict(dsink=torch.zeros(3, dtype=f32, device=device))),  # without attn_sink
        ("dsink", dict(attn_sink=sink, dsink=torch.zeros(2, dtype=f32, device=device))),
    ]
    for name, kwargs in cases:
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            kernels.sparse_attention_bwd(*base, **kwargs)


def test_sink_and_length_specializations_compile_for_sm90():
    """The Triton kernels launched with a sink and lengths compile for the H200 (deterministic dkv,
    what a deterministic build runs, and the fp32 atomics)."""
    from dsagen.backends import triton as triton_backend
    from dsagen.kernels import resolve_kernel

    spec = make_spec(7, 3, 48, 48)
    for point in ({"deterministic_dkv": 1}, {"deterministic_dkv": 0}):
        src = resolve_kernel(spec, "sparse_attention_bwd", "triton", "nvidia-h200", point)
        module = triton_backend.load(triton_backend.materialize(src.generated), interpret=False)
        launches = module.compile_signature(attn_sink=True, topk_length=True)
        assert launches[0][2]["HAS_SINK"] and launches[1][2]["HAS_LENGTH"]
        shim = types.SimpleNamespace(compile_signature=lambda launches=launches: launches)
        for compiled in triton_backend.compile_for(shim, arch=90):
            assert ".target sm_90" in compiled.asm["ptx"]


def test_workload_reference_matches_the_autograd_gradients():
    """The workload's formula reference (lse_s and the sink's term), given forward64's own float64 out
    and lse, is its gradient."""
    spec = make_spec(37, 3, 80, 48)
    case = Case(spec, torch.Generator().manual_seed(3), 8, 53)
    q, kv, idx, _, _, d_out, scale, sink, lengths = case.args("cpu")
    got = workload(get_op("sparse_attention_bwd")).reference(spec, q, kv, idx, case.out64, case.lse64, d_out, scale,
                                                             sink, lengths)
    assert len(got) == 3
    for name, want, have in zip(("dq", "dkv", "dsink"), case.grads, got):
        assert_close(f"sparse_attention_bwd.{name}", have, want, 1e-12)
