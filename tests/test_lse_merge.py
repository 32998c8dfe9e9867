"""lse_merge: the generated LSE merge on both backends against its float64 reference at odd shapes,
with partials that carry no mass (+inf and -inf lse), rows with none anywhere, NaN, strided
inputs, outputs poisoned before the call and inputs inside poisoned margins (a stray read brings
NaN into the result, a stray write changes a margin); and merge_attention running it."""
from __future__ import annotations

import math

import pytest
import torch

import dsagen
from dsagen.backends.tvm import available as tvm_problem
from dsagen.distributed import merge_attention
from dsagen.distributed.merge import merge_in_torch
from dsagen.ops.lse_merge_workload import reference_lse_merge
from dsagen.verify import assert_close
from dsagen.workloads import workload

SPEC = dsagen.Spec(attention=dsagen.AttentionSpec(heads=3, qk_dim=64, v_dim=64))
TOL = {torch.bfloat16: workload("lse_merge").tolerance("out.bf16"), torch.float32: workload("lse_merge").tolerance("out.fp32")}
SHAPES = [(1, 1, 3, 5), (2, 7, 3, 64), (3, 7, 3, 512), (3, 0, 3, 5), (2, 1, 3, 64)]
MARGIN = 2


@pytest.fixture(scope="module", params=["triton", "tvm"])
def kernels(request):
    if request.param == "tvm" and (problem := tvm_problem()):
        pytest.skip(problem)
    return dsagen.build(SPEC, backend=request.param)


def partials(gen, P, N, H, dv, dtype):
    """Random partials, lses over +-8; where the shape allows: one partial without mass (+inf),
    one with lse -inf, a row without mass anywhere (every lse +inf, its outs NaN: never read)."""
    outs = torch.randn(P, N, H, dv, generator=gen).to(dtype)
    lses = torch.rand(P, N, H, generator=gen) * 16 - 8
    if N:
        lses[0, 0, 0] = math.inf
        outs[0, 0, 0] = math.nan
        lses[:, N - 1, H - 1] = math.inf
        outs[:, N - 1, H - 1] = math.nan
        if P > 1:
            lses[P - 1, 0, 1] = -math.inf
            outs[P - 1, 0, 1] = math.nan
    return outs, lses


def inside_margins(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): t's values in the middle of a NaN-filled buffer, MARGIN more on every side."""
    buffer = torch.full([n + 2 * MARGIN for n in t.shape], math.nan, dtype=t.dtype)
    view = buffer[tuple(slice(MARGIN, MARGIN + n) for n in t.shape)]
    view.copy_(t)
    return view, buffer


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_merged(out, lse, ref_out, ref_lse, dtype):
    """No NaN where the reference has none, +inf exactly where it has it, close elsewhere."""
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out)) and torch.equal(torch.isnan(lse), torch.isnan(ref_lse))
    keep = ~torch.isnan(ref_lse)
    if keep.any():
        assert_close("lse_merge.out", out[keep], ref_out[keep], TOL[dtype])
        assert_close("lse_merge.lse", lse[keep], ref_lse[keep], workload("lse_merge").tolerance("lse"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P{}-N{}-H{}-Dv{}".format(*s))
def test_lse_merge_matches_float64_inside_poisoned_margins(kernels, gen, shape, dtype):
    outs, lses = partials(gen, *shape, dtype)
    ref_out, ref_lse = reference_lse_merge(outs, lses)
    outs_v, outs_b = inside_margins(outs)
    lses_v, lses_b = inside_margins(lses)
    out_v, out_b = inside_margins(torch.full(outs.shape[1:], math.nan, dtype=dtype))
    lse_v, lse_b = inside_margins(torch.full(lses.shape[1:], math.nan))
    before = [b.clone() for b in (outs_b, lses_b, out_b, lse_b)]
    out, lse = kernels.lse_merge(outs_v, lses_v, out=out_v, lse=lse_v)
    assert out is out_v and lse is lse_v
    assert_merged(out, lse, ref_out, ref_lse, dtype)
    if shape[1]:
        assert (out[-1, -1] == 0).all() and lse[-1, -1] == math.inf, "no mass anywhere: out 0, lse +inf"
    for got, was, view in zip((outs_b, lses_b, out_b, lse_b), before, (outs_v, lses_v, out_v, lse_v)):
        margin = torch.ones_like(got, dtype=torch.bool)
        margin[tuple(slice(MARGIN, MARGIN + n) for n in view.shape)] = False
        assert torch.equal(bits(got[margin]), bits(was[margin])), "a margin was written"


def test_lse_merge_nan_lse_and_nan_out_with_mass(kernels):
    """A NaN lse makes its row NaN (out and lse); a NaN out with mass makes out NaN, lse stays; a
    NaN out of a partial without mass is never read."""
    outs = torch.ones(3, 3, 1, 4)
    lses = torch.zeros(3, 3, 1)
    lses[1, 0, 0] = math.nan
    outs[2, 1, 0, 2] = math.nan
    lses[0, 2, 0], outs[0, 2, 0] = math.inf, math.nan
    out, lse = kernels.lse_merge(outs, lses)
    assert torch.isnan(out[0]).all() and torch.isnan(lse[0]).all()
    assert torch.isnan(out[1, 0, 2]) and not torch.isnan(out[1, 0, [0, 1, 3]]).any()
    assert lse[1, 0] == pytest.approx(math.log(3.0))
    assert torch.equal(out[2, 0], torch.ones(4)) and lse[2, 0] == pytest.approx(math.log(2.0))


def test_lse_merge_handles_strides_and_refuses_bad_arguments(kernels, gen):
    """Strided leading dimensions are read in place; a last dimension that is not unit-stride, a
    wrong dtype or shape is refused naming the argument."""
    outs, lses = partials(gen, 3, 5, 3, 8, torch.float32)
    wide = torch.randn(3, 5, 6, 16, generator=gen)
    strided_outs = wide[:, :, ::2, :8]
    strided_outs.copy_(outs)
    ref_out, ref_lse = reference_lse_merge(outs, lses)
    out, lse = kernels.lse_merge(strided_outs, lses.transpose(0, 1).contiguous().transpose(0, 1))
    assert_merged(out, lse, ref_out, ref_lse, torch.float32)
    with pytest.raises(ValueError, match="outs must be contiguous in its last dimension"):
        kernels.lse_merge(wide[:, :, :3, ::2], lses)
    with pytest.raises(ValueError, match="outs must have dtype torch.bfloat16 or torch.float32"):
        kernels.lse_merge(outs.half(), lses)
    with pytest.raises(ValueError, match=r"lses must have shape \[3, 5, 3\]"):
        kernels.lse_merge(outs, lses[:, :4])
    with pytest.raises(ValueError, match="lses must have dtype torch.float32"):
        kernels.lse_merge(outs, lses.double())
    with pytest.raises(ValueError, match=r"out must have shape \[5, 3, 8\]"):
        kernels.lse_merge(outs, lses, out=torch.empty(5, 3, 9))
    with pytest.raises(ValueError, match="at least one partial"):
        kernels.lse_merge(outs[:0], lses[:0])


def test_merge_attention_runs_the_kernel_of_the_build(kernels, gen, monkeypatch):
    """merge_attention merges [P, B, s_q, H, Dv] partials through the build's lse_merge, as the
    float64 reference does; under autograd it merges in torch and gradients flow."""
    outs, lses = partials(gen, 3, 6, 3, 5, torch.bfloat16)
    outs5, lses4 = outs.reshape(3, 2, 3, 3, 5), lses.reshape(3, 2, 3, 3)
    calls = []
    launched = type(kernels.kernel("lse_merge")).__call__
    monkeypatch.setattr(type(kernels.kernel("lse_merge")), "__call__",
                        lambda self, *a, **k: calls.append(self.backend) or launched(self, *a, **k))
    out, lse = merge_attention(outs5, lses4, kernels)
    assert calls == [kernels.backend]
    ref_out, ref_lse = reference_lse_merge(outs, lses)
    assert_merged(out.reshape(6, 3, 5), lse.reshape(6, 3), ref_out, ref_lse, torch.bfloat16)
    plain = outs.float().clone().requires_grad_()
    got, _ = merge_attention(plain, lses, kernels)
    assert calls == [kernels.backend], "a merge that needs grad runs in torch"
    got.nan_to_num(0).sum().backward()
    assert plain.grad is not None and torch.isfinite(plain.grad).all()


def test_torch_merge_and_kernel_agree_on_conventions(kernels):
    """The torch path (autograd, other dtypes) and the kernel give the same on every convention."""
    outs = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]], [[math.nan, math.nan]], [[math.nan, 5.0]]])[:, None]  # [4, 1, 1, 2]
    lses = torch.tensor([[0.0], [math.log(3.0)], [math.inf], [-math.inf]])[:, None]
    k_out, k_lse = kernels.lse_merge(outs, lses)
    t_out, t_lse = merge_in_torch(outs, lses)
    assert torch.allclose(k_out, t_out) and torch.allclose(k_lse, t_lse)
    assert torch.allclose(k_out, torch.tensor([[[2.5, 3.5]]])) and k_lse.item() == pytest.approx(math.log(4.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_lse_merge_applies_the_sink_once_after_the_merge(kernels, gen, dtype):
    """attn_sink [H]: out *= 1 / (1 + exp(sink - lse)) with lse unchanged, against the float64
    merge; sinks -inf (no effect), +inf (out 0), 0 and random; the row without mass keeps out 0 and
    lse +inf; a NaN sink makes its head's out NaN wherever there is mass. Applied per partial
    instead, the result would differ (the check below proves the test tells them apart)."""
    P, N, H, dv = 3, 5, 5, 7
    outs, lses = partials(gen, P, N, H, dv, dtype)
    sink = torch.tensor([-math.inf, math.inf, 0.0, 0.0, 0.0])
    sink[3:] = torch.randn(2, generator=gen) * 3
    ref_out, ref_lse = reference_lse_merge(outs, lses, sink)
    out = torch.full(outs.shape[1:], math.nan, dtype=dtype)
    lse = torch.full(lses.shape[1:], math.nan)
    got_out, got_lse = kernels.lse_merge(outs, lses, sink, out=out, lse=lse)
    assert got_out is out and got_lse is lse
    assert_merged(out, lse, ref_out, ref_lse, dtype)
    plain_out, plain_lse = reference_lse_merge(outs, lses)
    assert torch.equal(lse, kernels.lse_merge(outs, lses)[1]), "the sink leaves lse as it was"
    assert torch.equal(out[:, 0], kernels.lse_merge(outs, lses)[0][:, 0]), "sink -inf: no effect"
    assert (out[:, 1] == 0).all() and not torch.isnan(out[:, 1]).any(), "sink +inf: out 0"
    assert (out[-1, -1] == 0).all() and lse[-1, -1] == math.inf, "no mass: out 0 whatever the sink"
    assert not torch.allclose(ref_out[:, 2:].float(), plain_out[:, 2:].float(), atol=1e-2), "the sink must matter"
    nan_sink = sink.clone()
    nan_sink[2] = math.nan
    nan_out, _ = kernels.lse_merge(outs, lses, nan_sink)
    assert torch.isnan(nan_out[:-1, 2]).all() and not torch.isnan(nan_out[:, 3]).any()


def test_lse_merge_refuses_a_bad_sink(kernels, gen):
    outs, lses = partials(gen, 2, 3, 4, 5, torch.float32)
    with pytest.raises(ValueError, match=r"attn_sink must have shape \[4\]"):
        kernels.lse_merge(outs, lses, torch.zeros(3))
    with pytest.raises(ValueError, match="attn_sink must have dtype torch.float32"):
        kernels.lse_merge(outs, lses, torch.zeros(4, dtype=torch.bfloat16))
