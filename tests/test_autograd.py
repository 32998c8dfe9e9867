"""Training through autograd: dsagen::sparse_attention and dsagen::indexer_loss are differentiated by
their registered backward ops (dsagen/autograd.py).

Gradients from `.backward()` against the float64 references of the backward formulas (themselves
gradchecked in test_sparse_attention_bwd.py and test_indexer_loss.py), on both backends at odd
shapes with invalid indices and an empty row; which inputs get gradients; torch.compile
(fullgraph) of forward + backward; a DSA layer's training step; the refusals that remain.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import dsagen
from dsagen import reference
from dsagen.verify import assert_close

TRAIN = dsagen.load_spec("specs/deepseek_v32_training.toml")
BAD = (-(2**31), -1, 2**31 - 1)  # with SKV itself, added per case


def small_spec(H=5, Dqk=40, Dv=24, k=13, Hi=3, Di=24) -> dsagen.Spec:
    return dataclasses.replace(
        TRAIN, attention=dataclasses.replace(TRAIN.attention, heads=H, qk_dim=Dqk, v_dim=Dv),
        topk=dataclasses.replace(TRAIN.topk, k=k), indexer=dataclasses.replace(TRAIN.indexer, heads=Hi, head_dim=Di))


def selected(gen, S, SKV, k, device):
    """Distinct indices per row with every kind of invalid one mixed in; row 0 all invalid; the
    last kv row selected by nobody."""
    bad = torch.tensor(BAD + (SKV,))
    rows = []
    for t in range(S):
        n_valid = 0 if t == 0 else int(torch.randint(1, min(k, SKV - 1) + 1, (1,), generator=gen))
        row = torch.cat([torch.randperm(SKV - 1, generator=gen)[:n_valid],
                         bad[torch.randint(0, 4, (k - n_valid,), generator=gen)]])
        rows.append(row[torch.randperm(k, generator=gen)])
    return torch.stack(rows).int().to(device)


def attention_case(gen, spec, S, SKV, device):
    at = spec.attention
    q = torch.randn(S, at.heads, at.qk_dim, generator=gen).bfloat16().to(device)
    kv = torch.randn(SKV, at.qk_dim, generator=gen).bfloat16().to(device)
    return q, kv, selected(gen, S, SKV, spec.topk.k, device)


@pytest.mark.parametrize("S,SKV", [(7, 29), (3, 70)], ids=["S7-SKV29", "S3-SKV70"])
def test_sparse_attention_backward_matches_reference(backend, device, gen, S, SKV):
    spec = small_spec()
    kernels = dsagen.build(spec, backend=backend)
    q, kv, idx = attention_case(gen, spec, S, SKV, device)
    q.requires_grad_()
    kv.requires_grad_()
    out, lse = kernels.sparse_attention(q, kv, idx)
    assert out.requires_grad and not lse.requires_grad, "out carries gradients, lse none"
    d_out = torch.randn(out.shape, generator=gen).bfloat16().to(device)
    out.backward(d_out)
    ref_dq, ref_dkv = reference.sparse_attention_bwd(q.detach().cpu(), kv.detach().cpu(), idx.cpu(),
                                                     out.detach().cpu(), lse.detach().cpu(), d_out.cpu(),
                                                     spec.attention.softmax_scale, spec.attention.v_dim)
    assert_close("sparse_attention_bwd.dq", q.grad, ref_dq)
    assert_close("sparse_attention_bwd.dkv", kv.grad, ref_dkv)
    assert torch.all(q.grad[0] == 0), "a row with no valid index gets zero gradients"
    assert torch.all(kv.grad[-1] == 0), "a kv row nobody selected gets exactly 0"


def test_only_inputs_that_require_grad_get_one(device, gen):
    spec = small_spec()
    kernels = dsagen.build(spec)
    q, kv, idx = attention_case(gen, spec, 5, 31, device)
    q.requires_grad_()
    out, _ = kernels.sparse_attention(q, kv, idx)
    (out.float() ** 2).sum().backward()  # through a cast and a square: d_out is 2 out, in bf16
    assert q.grad is not None and kv.grad is None
    assert not torch.isnan(q.grad).any()


def test_grad_through_out_with_an_expanded_upstream_gradient(device, gen):
    """out.sum() sends a stride-0 gradient: the backward makes it contiguous."""
    spec = small_spec()
    kernels = dsagen.build(spec)
    q, kv, idx = attention_case(gen, spec, 4, 23, device)
    kv.requires_grad_()
    out, lse = kernels.sparse_attention(q, kv, idx)
    out.sum().backward()
    ones = torch.ones_like(out)
    _, ref_dkv = reference.sparse_attention_bwd(q.cpu(), kv.detach().cpu(), idx.cpu(), out.detach().cpu(),
                                                lse.cpu(), ones.cpu(), spec.attention.softmax_scale,
                                                spec.attention.v_dim)
    assert_close("sparse_attention_bwd.dkv", kv.grad, ref_dkv)


def loss_case(gen, spec, S, SKV, device):
    """Indexer inputs (bf16 q, k; fp32 weights) and the attention inputs whose distribution they learn."""
    ix, at = spec.indexer, spec.attention
    iq = torch.randn(S, ix.heads, ix.head_dim, generator=gen).bfloat16().to(device)
    ik = torch.randn(SKV, ix.head_dim, generator=gen).bfloat16().to(device)
    w = (torch.randn(S, ix.heads, generator=gen) / ix.heads).to(device)
    aq, akv, idx = attention_case(gen, spec, S, SKV, device)
    _, alse = reference.sparse_attention(aq.cpu(), akv.cpu(), idx.cpu(), at.softmax_scale, at.v_dim)
    return iq, ik, w, aq, akv, alse.float().to(device), idx


def test_indexer_loss_backward_matches_reference(backend, device, gen):
    spec = small_spec()
    kernels = dsagen.build(spec, backend=backend)
    iq, ik, w, aq, akv, alse, idx = loss_case(gen, spec, 6, 37, device)
    leaves = [x.clone().requires_grad_() for x in (iq, ik, w)]
    aq.requires_grad_()  # the target's inputs: read as constants (V3.2 detaches them)
    loss, index_lse = kernels.indexer_loss(*leaves, aq, akv, alse, idx)
    assert loss.requires_grad and not index_lse.requires_grad
    d_loss = torch.rand(loss.shape, generator=gen).to(device)
    loss.backward(d_loss)
    ref = reference.indexer_loss_bwd(iq.cpu(), ik.cpu(), w.cpu(), aq.detach().cpu(), akv.cpu(), alse.cpu(),
                                     idx.cpu(), spec.attention.softmax_scale, index_lse.detach().cpu(), d_loss.cpu())
    for what, leaf, want in zip(("dq", "dk", "dweights"), leaves, ref):
        assert_close(f"indexer_loss.{what}", leaf.grad, want)
    assert aq.grad is None, "no gradient flows into the attention through the indexer loss"
    assert torch.all(leaves[0].grad[0] == 0) and loss[0].item() == 0.0, "an all-invalid row: loss 0, no gradient"


def test_dense_warm_up_indices(device, gen):
    """The warm-up form: every key of each row's window, -1 padded; the same kernels."""
    ks = torch.tensor([0, 0, 2, 5], dtype=torch.int32, device=device)
    ke = torch.tensor([1, 4, 2, 9], dtype=torch.int32, device=device)
    idx = dsagen.dense_window_indices(ks, ke)
    assert idx.tolist() == [[0, -1, -1, -1], [0, 1, 2, 3], [-1, -1, -1, -1], [5, 6, 7, 8]]


def test_compiled_training_step_equals_eager(device, gen):
    """torch.compile(fullgraph=True) traces forward and backward of both differentiable ops."""
    spec = small_spec()
    kernels = dsagen.build(spec, deterministic=True)  # dkv's sums then do not depend on the launch order
    q, kv, idx = attention_case(gen, spec, 5, 29, device)
    iq, ik, w, aq, akv, alse, _ = loss_case(gen, spec, 5, 29, device)

    def forward(q, kv, iq, ik, w):
        out, lse = kernels.sparse_attention(q, kv, idx)
        loss, _ = kernels.indexer_loss(iq, ik, w, q.detach(), kv.detach(), lse, idx)
        return out.float().square().mean() + loss.sum()

    def fresh():
        return [x.detach().clone().requires_grad_() for x in (q, kv, iq, ik, w)]

    eager_leaves, compiled_leaves = fresh(), fresh()
    eager = forward(*eager_leaves)
    eager.backward()
    torch._dynamo.reset()
    # aot_autograd traces the backward graph too: dsagen::sparse_attention_bwd and indexer_loss_bwd
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")(*compiled_leaves)
    compiled.backward()
    assert torch.equal(eager, compiled)
    for name, a, b in zip(("q", "kv", "iq", "ik", "w"), eager_leaves, compiled_leaves):
        if name == "ik" and device.type == "cuda":  # summed with fp32 atomics on the GPU: order-dependent
            torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=1e-2, atol=1e-5)
        else:
            assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_double_backward_raises_naming_the_op(device, gen, compiled):
    """create_graph=True gives the same first gradients, which carry a graph; differentiating them
    again raises (never zeros). Compiled, AOT autograd refuses a double backward itself."""
    spec = small_spec()
    kernels = dsagen.build(spec, deterministic=True)  # the two first-order runs then agree bitwise
    q, kv, idx = attention_case(gen, spec, 4, 23, device)
    iq, ik, w, aq, akv, alse, _ = loss_case(gen, spec, 4, 23, device)

    def attention(q, kv):
        return kernels.sparse_attention(q, kv, idx)[0].float().square().sum()

    def loss(iq, ik, w):
        return kernels.indexer_loss(iq, ik, w, aq, akv, alse, idx)[0].square().sum()

    for op, forward, inputs in (("sparse_attention", attention, (q, kv)), ("indexer_loss", loss, (iq, ik, w))):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        once = torch.autograd.grad(forward(*leaves), leaves)
        if compiled:
            torch._dynamo.reset()
            forward = torch.compile(forward, fullgraph=True, backend="aot_eager")
        grads = torch.autograd.grad(forward(*leaves), leaves, create_graph=True)
        for a, b in zip(once, grads):
            assert torch.equal(a, b.detach()) and b.requires_grad
        match = "double backward" if compiled else rf"^{op}: double backward \(create_graph=True\) is not supported"
        with pytest.raises(RuntimeError, match=match):
            torch.autograd.grad(sum(g.float().sum() for g in grads), leaves)


def test_dsa_layer_trains(device, gen):
    """dsa(): the selection runs without a graph (integer indices), attention with one; the indexer
    trains through indexer_loss with the attention's lse."""
    spec = dataclasses.replace(small_spec(k=8), topk=dataclasses.replace(TRAIN.topk, k=8))
    kernels = dsagen.build(spec)
    S, SKV = 6, 21
    q, kv, _ = attention_case(gen, spec, S, SKV, device)
    iq, ik, w, *_ = loss_case(gen, spec, S, SKV, device)
    ks = torch.zeros(S, dtype=torch.int32, device=device)
    ke = torch.arange(SKV - S + 1, SKV + 1, dtype=torch.int32, device=device)
    params = [x.requires_grad_() for x in (q, kv, iq, ik, w)]
    res = kernels.dsa(q, kv, iq, ik, None, w, ks, ke)
    loss, _ = kernels.indexer_loss(iq, ik, w, q.detach(), kv.detach(), res.lse, res.indices)
    (res.out.float().mean() + loss.mean()).backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_kernels_without_backward_still_refuse(device, gen):
    spec = small_spec()
    kernels = dsagen.build(spec)
    iq, ik, w, *_ = loss_case(gen, spec, 3, 11, device)
    ks = torch.zeros(3, dtype=torch.int32, device=device)
    ke = torch.full((3,), 11, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="no backward pass.*indexer_loss"):
        kernels.indexer(iq.requires_grad_(), ik, None, w, ks, ke)
    q, kv, idx = attention_case(gen, spec, 3, 11, device)
    out = torch.full((3, spec.attention.heads, spec.attention.v_dim), math.nan, dtype=torch.bfloat16, device=device)
    with pytest.raises(RuntimeError, match="written in place, outside autograd"):
        kernels.sparse_attention(q.requires_grad_(), kv, idx, out=out)


def test_a_training_kernel_on_an_fp8_spec_says_why(device):
    """fp8 stays inference-only: the training kernels are not offered, and a call says why."""
    kernels = dsagen.build(dsagen.load_spec("specs/deepseek_v32.toml"))
    assert "indexer_loss" not in kernels.kernels() and "sparse_attention_bwd" in kernels.kernels()
    with pytest.raises(dsagen.BackendError, match="needs a bf16 indexer.*fp8_e4m3, which is inference-only"):
        kernels.indexer_loss(*(torch.zeros(1, device=device) for _ in range(7)))
