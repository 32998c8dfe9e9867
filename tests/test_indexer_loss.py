"""The indexer's training loss (indexer_loss) and its backward (indexer_loss_bwd) on both backends.

The explicit float64 backward formulas pass gradcheck against the float64 forward; the kernels
match those references at odd shapes (no size a multiple of any block) with poisoned outputs,
every kind of invalid index, an all-invalid row, keys selected by many rows and by none; the dense
warm-up form equals a loss materialized over the whole S x SKV window; strided inputs give the same
bits as contiguous ones; bad arguments are named; both Triton kernels compile for sm_90.
"""
from __future__ import annotations

import math

import pytest
import torch

from dsagen.workloads import workload
import dsagen
from dsagen import reference
from dsagen.ops import get_op
from dsagen.ops.indexer_loss import dense_window_indices
from dsagen.verify import assert_close

S_, SKV_ = 5, 29
INVALID = (-(2**31), -1, SKV_, 2**31 - 1)


def odd_spec(k: int = 13, dtype: str = "bf16") -> dsagen.Spec:
    """Hi=3, Di=24, H=3, Dqk=40: no dimension is a multiple of any block."""
    return dsagen.Spec(indexer=dsagen.IndexerSpec(heads=3, head_dim=24, dtype=dtype), topk=dsagen.TopKSpec(k=k),
                       attention=dsagen.AttentionSpec(heads=3, qk_dim=40, v_dim=32, sm_scale=0.21))


def seed_of(gen) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))


def loss_inputs(spec, device, gen, S=S_, SKV=SKV_):
    """The op's own workload inputs (causal top-k indices, alse from the float64 forward)."""
    return list(workload("indexer_loss").inputs(spec, S, SKV, device, seed_of(gen)))


def with_lse(args):
    """args with alse recomputed for their (edited) indices, as the attention forward would give it."""
    from dsagen.ops.indexer_loss_workload import attention_lse

    args = list(args)
    args[5] = attention_lse(args[3], args[4], args[6], args[7])
    return args


def run_both(kernels, args, d_loss, poison=True):
    """Forward then backward through dsagen (kernels.run: output buffers allowed), into poisoned
    buffers when `poison`, else through the torch.library ops."""
    fwd_op, bwd_op = get_op("indexer_loss"), get_op("indexer_loss_bwd")
    spec = kernels.spec
    outs = workload(fwd_op).poisoned_outputs(spec, args) if poison else {}
    loss, lse = kernels.run("indexer_loss", *args, **outs)
    bargs = list(args) + [lse, d_loss]
    bouts = workload(bwd_op).poisoned_outputs(spec, bargs) if poison else {}
    grads = kernels.run("indexer_loss_bwd", *bargs, **bouts)
    return (loss, lse), grads


def check_against_reference(args, fwd, grads, d_loss):
    loss, lse = fwd
    ref_loss, ref_lse = reference.indexer_loss(*args)
    assert_close("indexer_loss.loss", loss, ref_loss)
    assert_close("indexer_loss.loss", lse, ref_lse)
    ref_q, ref_k, ref_w = reference.indexer_loss_bwd(*args, lse, d_loss)
    assert_close("indexer_loss.dq", grads[0], ref_q)
    assert_close("indexer_loss.dk", grads[1], ref_k)
    assert_close("indexer_loss.dweights", grads[2], ref_w)


# ------------------------------------------------------------------------------------------------
# the explicit backward formulas

class _ExplicitLoss(torch.autograd.Function):
    """The float64 reference forward with the reference's written-out backward."""

    @staticmethod
    def forward(ctx, iq, ik, w, aq, akv, alse, idx, scale):
        loss, lse = reference.indexer_loss(iq, ik, w, aq, akv, alse, idx, scale)
        ctx.save_for_backward(iq, ik, w, aq, akv, alse, idx, lse)
        ctx.scale = scale
        return loss

    @staticmethod
    def backward(ctx, d_loss):
        iq, ik, w, aq, akv, alse, idx, lse = ctx.saved_tensors
        d_iq, d_ik, d_w = reference.indexer_loss_bwd(iq, ik, w, aq, akv, alse, idx, ctx.scale, lse, d_loss)
        return d_iq, d_ik, d_w, None, None, None, None, None


def generic_tiny_inputs(seed: int):
    """float64 inputs where no selected indexer dot lies near relu's kink (|iq . ik| > 0.05), with
    an invalid slot, a repeated key and one row with no valid index."""
    g = torch.Generator().manual_seed(seed)
    n_q, n_kv, hi, di, h, dqk, k = 3, 7, 2, 5, 2, 6, 4
    idx = torch.tensor([[0, 3, -1, 6], [2, 2, 5, 7], [-5, 9, -1, 100]], dtype=torch.int32)
    while True:
        iq = torch.randn(n_q, hi, di, generator=g, dtype=torch.float64)
        ik = torch.randn(n_kv, di, generator=g, dtype=torch.float64)
        if (torch.einsum("tjd,sd->tjs", iq, ik).abs() > 0.05).all():
            break
    w = torch.randn(n_q, hi, generator=g, dtype=torch.float64)
    aq = torch.randn(n_q, h, dqk, generator=g, dtype=torch.float64)
    akv = torch.randn(n_kv, dqk, generator=g, dtype=torch.float64)
    alse = torch.randn(n_q, h, generator=g, dtype=torch.float64)  # any lse: p is L1-normalized per row
    assert idx.shape[1] == k
    return iq, ik, w, aq, akv, alse, idx, 0.4


@pytest.mark.parametrize("seed", [1, 2])
def test_explicit_backward_formulas_pass_gradcheck(seed):
    iq, ik, w, aq, akv, alse, idx, scale = generic_tiny_inputs(seed)
    leaves = [x.clone().requires_grad_() for x in (iq, ik, w)]
    assert torch.autograd.gradcheck(lambda a, b, c: _ExplicitLoss.apply(a, b, c, aq, akv, alse, idx, scale),
                                    leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_explicit_backward_equals_autograd_of_the_forward():
    """The same gradients as torch's autograd through the float64 forward (target detached)."""
    iq, ik, w, aq, akv, alse, idx, scale = generic_tiny_inputs(3)
    leaves = [x.clone().requires_grad_() for x in (iq, ik, w)]
    d_loss = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    loss, lse = reference.indexer_loss(*leaves, aq, akv, alse, idx, scale)
    loss.backward(d_loss)
    explicit = reference.indexer_loss_bwd(iq, ik, w, aq, akv, alse, idx, scale, lse.detach(), d_loss)
    for got, leaf in zip(explicit, leaves):
        assert torch.allclose(got, leaf.grad, rtol=1e-10, atol=1e-12)
    assert loss[2] == 0 and lse[2] == math.inf and (explicit[0][2] == 0).all()  # the row with no valid index


# ------------------------------------------------------------------------------------------------
# kernels against the references

def adversarial_indices(args):
    """Every invalid kind in row 0, an all-invalid row 2, key 0 selected by every other row, and
    keys SKV-3.. selected by nobody."""
    idx = args[6].clone()
    n_q, k = idx.shape
    idx = torch.where(idx >= SKV_ - 3, 1, idx)  # nobody selects the last three keys
    for i, bad in enumerate(INVALID):
        idx[0, 2 * i + 1] = bad
    idx[2] = torch.tensor([INVALID[i % 4] for i in range(k)], dtype=torch.int32)
    for t in (1, 3, 4):
        idx[t, -1] = 0
    args[6] = idx.to(args[6].device)
    return with_lse(args)


def test_kernels_match_the_references_with_adversarial_indices(device, backend, gen):
    spec = odd_spec()
    kernels = dsagen.build(spec, backend=backend)
    args = adversarial_indices(loss_inputs(spec, device, gen))
    d_loss = (torch.rand(S_, generator=gen) + 0.5).to(device)
    fwd, grads = run_both(kernels, args, d_loss)
    check_against_reference(args, fwd, grads, d_loss)
    loss, lse = fwd
    assert loss[2] == 0 and lse[2] == math.inf
    assert (grads[0][2] == 0).all() and (grads[2][2] == 0).all()
    assert (grads[1][SKV_ - 3:] == 0).all(), "keys nobody selected must have d_ik exactly 0"
    assert grads[1][0].abs().sum() > 0
    # the torch.library op path (fresh outputs) gives the same bits as the poisoned buffers
    fwd2, grads2 = run_both(kernels, args, d_loss, poison=False)
    assert all(torch.equal(a, b) for a, b in zip(fwd + grads, fwd2 + grads2))


def test_workload_check_and_naive_agree(device, backend, gen):
    """The recipe the tuner and `dsagen bench` use: inputs, poisoned outputs, check, naive PyTorch."""
    spec = odd_spec()
    kernels = dsagen.build(spec, backend=backend)
    for name in ("indexer_loss", "indexer_loss_bwd"):
        op = get_op(name)
        inputs = workload(op).inputs(spec, S_, SKV_, device, seed_of(gen))
        result = kernels.run(name, *inputs, **workload(op).poisoned_outputs(spec, inputs))
        assert "RMS ratio" in workload(op).check(spec, inputs, result, torch.arange(S_))
        naive = workload(op).naive(spec, inputs)()
        assert "RMS ratio" in workload(op).check(spec, inputs, naive, torch.arange(S_))


def dense_loss(iq, ik, w, aq, akv, ks, ke, scale):
    """The loss materialized over the whole S x SKV grid (float64, differentiable in iq, ik, w):
    dense attention over each row's window, its head-summed, normalized distribution as the target."""
    n_kv = ik.shape[0]
    logits = reference.indexer(iq, ik, None, w, ks, ke)  # -inf outside the window
    cols = torch.arange(n_kv)[None, :]
    inside = (cols >= ks.long()[:, None]) & (cols < ke.long()[:, None])
    att = scale * torch.einsum("thd,sd->ths", aq.double(), akv.double())
    att = att.masked_fill(~inside[:, None, :], -math.inf)
    alse = torch.logsumexp(att, -1)
    p = torch.softmax(att, -1).sum(1)
    p = p / p.sum(-1, keepdim=True)
    logsm = torch.log_softmax(logits, -1).masked_fill(~inside, 0.0)
    loss = (torch.xlogy(p, p) - p * logsm).sum(-1)
    return loss, alse


def test_dense_warmup_form_equals_the_materialized_loss(device, backend, gen):
    spec = odd_spec()
    kernels = dsagen.build(spec, backend=backend)
    iq, ik, w, aq, akv, *_ = loss_inputs(spec, "cpu", gen)
    ks = torch.tensor([0, 3, 0, 27, 10], dtype=torch.int32)
    ke = torch.tensor([25, 26, 27, 28, 29], dtype=torch.int32)  # causal ends, varied starts, one single key
    idx = dense_window_indices(ks, ke)
    assert idx.shape == (S_, 27) and idx[3].tolist()[:2] == [27, -1] and idx[2].tolist() == list(range(27))
    leaves = [x.double().requires_grad_() for x in (iq, ik, w)]
    ref_loss, alse = dense_loss(*leaves, aq, akv, ks, ke, 0.21)
    d_loss = torch.rand(S_, generator=gen) + 0.5
    ref_loss.backward(d_loss)
    args = [x.to(device) for x in (iq, ik, w, aq, akv, alse.float(), idx)] + [0.21]
    (loss, lse), grads = run_both(kernels, args, d_loss.to(device))
    assert_close("indexer_loss.loss", loss, ref_loss.detach())
    assert_close("indexer_loss.dq", grads[0], leaves[0].grad)
    assert_close("indexer_loss.dk", grads[1], leaves[1].grad)
    assert_close("indexer_loss.dweights", grads[2], leaves[2].grad)


def test_noncontiguous_inputs_give_the_same_bits(device, backend, gen):
    spec = odd_spec()
    kernels = dsagen.build(spec, backend=backend)
    args = loss_inputs(spec, device, gen)
    iq, ik, w, aq, akv, alse, idx, scale = args
    d_loss = (torch.rand(S_, generator=gen) + 0.5).to(device)

    def strided(x, pad_last=3, pad_mid=0):
        """x as a view into a larger buffer (strides not those of a contiguous tensor)."""
        shape = list(x.shape)
        shape[-1] += pad_last
        if x.dim() == 3:
            shape[1] += pad_mid
        big = torch.zeros(shape, dtype=x.dtype, device=x.device)
        view = big[..., 1:1 + x.shape[-1]] if x.dim() < 3 else big[:, :x.shape[1], 1:1 + x.shape[-1]]
        view.copy_(x)
        assert not view.is_contiguous()
        return view

    sargs = [strided(iq, pad_mid=2), strided(ik), strided(w), strided(aq, pad_mid=1), strided(akv), strided(alse),
             strided(idx), scale]
    fwd, grads = run_both(kernels, args, d_loss, poison=False)
    fwd_s, grads_s = run_both(kernels, sargs, d_loss, poison=False)
    assert all(torch.equal(a, b) for a, b in zip(fwd + grads, fwd_s + grads_s))


def test_zero_width_and_empty_calls(device, backend, gen):
    spec = odd_spec()
    kernels = dsagen.build(spec, backend=backend)
    args = loss_inputs(spec, device, gen)
    args[6] = args[6][:, :0]
    (loss, lse), (d_iq, d_ik, d_w) = run_both(kernels, args, torch.ones(S_, device=device))
    assert (loss == 0).all() and (lse == math.inf).all()
    assert (d_iq == 0).all() and (d_ik == 0).all() and (d_w == 0).all()


# ------------------------------------------------------------------------------------------------
# arguments, specs, registry

def test_bad_arguments_name_the_argument(device):
    spec = odd_spec()
    kernels = dsagen.build(spec)
    args = workload("indexer_loss").inputs(spec, S_, SKV_, device, 0)
    iq, ik, w, aq, akv, alse, idx, scale = args
    cases = [
        (0, iq.float(), "iq must have dtype torch.bfloat16"),
        (1, ik[:, :20], r"ik must have shape \[\*, 24\]"),
        (2, w[:-1], r"weights must have shape \[5, 3\]"),
        (3, aq[:, :2], r"aq must have shape \[5, 3, 40\]"),
        (4, akv[:-1], r"akv must have shape \[29, 40\]"),
        (5, alse.double(), "alse must have dtype torch.float32"),
        (6, idx.long(), "indices must have dtype torch.int32"),
        (7, -1.0, "sm_scale=-1.0 must be a finite number > 0"),
    ]
    for position, bad, message in cases:
        broken = list(args)
        broken[position] = bad
        with pytest.raises(ValueError, match=message):
            kernels.indexer_loss(*broken)
    lse = torch.zeros(S_, device=device)
    with pytest.raises(ValueError, match=r"index_lse must have shape \[5\]"):
        kernels.indexer_loss_bwd(*args, lse[:-1], lse)
    with pytest.raises(ValueError, match="d_loss must have dtype torch.float32"):
        kernels.indexer_loss_bwd(*args, lse, lse.double())
    with pytest.raises(ValueError, match=r"d_ik must have shape \[29, 24\]"):
        kernels.run("indexer_loss_bwd", *args, lse, lse, d_ik=torch.zeros(28, 24, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match=r"loss must have shape \[5\]"):
        kernels.run("indexer_loss", *args, loss=lse[:-1])


def test_an_fp8_indexer_is_inference_only():
    from dsagen.kernels import resolve_kernel

    spec = odd_spec(dtype="fp8_e4m3")
    for name in ("indexer_loss", "indexer_loss_bwd"):
        op = get_op(name)
        assert not op.enabled(spec, "triton") and not op.enabled(spec, "tvm")
        assert op.enabled(odd_spec(), "triton") and op.enabled(odd_spec(), "tvm")
        args = workload(op).inputs(odd_spec(), 2, 9, "cpu", 0)
        with pytest.raises(ValueError, match=f"{name} trains the indexer and needs a bf16 indexer.*inference-only"):
            op.check_args(spec, *args)
        with pytest.raises(ValueError, match="needs a bf16 indexer"):
            resolve_kernel(spec, name, "triton")
    v32 = dsagen.load_spec("specs/deepseek_v32.toml")
    assert "indexer_loss" not in dsagen.build(v32).kernels()
    assert {"indexer_loss", "indexer_loss_bwd"} <= set(dsagen.build(dsagen.load_spec(
        "specs/deepseek_v32_training.toml")).kernels())


def test_the_ops_fake_and_cost():
    spec = dsagen.load_spec("specs/deepseek_v32_training.toml")
    args = workload("indexer_loss_bwd").inputs(odd_spec(), 2, 9, "cpu", 0)
    fake = get_op("indexer_loss").fake(odd_spec(), *args[:8])
    assert [tuple(t.shape) for t in fake] == [(2,), (2,)]
    fake = get_op("indexer_loss_bwd").fake(odd_spec(), *args)
    assert [(tuple(t.shape), t.dtype) for t in fake] == [((2, 3, 24), torch.bfloat16), ((9, 24), torch.bfloat16),
                                                        ((2, 3), torch.float32)]
    flops, _ = get_op("indexer_loss").cost(spec).evaluate({"S": 4096, "SKV": 8192})
    assert flops == 2 * 4096 * 2048 * (128 * 576 + 64 * 128)


@pytest.mark.parametrize("name", ["indexer_loss", "indexer_loss_bwd"])
@pytest.mark.parametrize("which", ["v32-training", "odd"])
def test_triton_kernels_compile_for_sm90(name, which):
    from dsagen.backends import triton as triton_backend
    from dsagen.gpus import get_gpu
    from dsagen.kernels import resolve_kernel

    spec = dsagen.load_spec("specs/deepseek_v32_training.toml") if which == "v32-training" else odd_spec()
    src = resolve_kernel(spec, name, "triton", "nvidia-h200")
    module = triton_backend.load(triton_backend.materialize(src.generated), interpret=False)
    for compiled in triton_backend.compile_for(module, arch=90):
        assert ".target sm_90" in compiled.asm["ptx"] and compiled.asm.get("cubin")
        assert compiled.metadata.shared <= get_gpu("nvidia-h200").smem_per_block
