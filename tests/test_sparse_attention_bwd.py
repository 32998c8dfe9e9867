"""The sparse MLA attention backward (dq, dkv) on both backends against the float64 reference, and
the reference itself against autograd's numerical gradients.

Odd shapes (no dimension a multiple of a block), poisoned outputs, every kind of invalid index,
empty and all-invalid rows, kv rows selected by many queries and by none, duplicates, non-contiguous
inputs, the deterministic dkv, and bad arguments named in the error."""
from __future__ import annotations

import math

import pytest
import torch

from dsagen.workloads import workload
import dsagen
from dsagen import reference
from dsagen.ops import get_op
from dsagen.verify import Mismatch, assert_close

BAD = (-(2**31), -1)  # plus SKV and 2**31 - 1, which depend on the problem


def make_spec(k=37, heads=3, qk_dim=80, v_dim=48, sm_scale=None):
    return dsagen.Spec(topk=dsagen.TopKSpec(k=k),
                       attention=dsagen.AttentionSpec(heads=heads, qk_dim=qk_dim, v_dim=v_dim, sm_scale=sm_scale))


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen)


def bwd_indices(gen, S: int, SKV: int, k: int) -> torch.Tensor:
    """Row 0 all invalid, row 1 a single valid index, the others a random valid count (one of them
    with a duplicate); every invalid kind mixed in. kv row 0 is selected by every row but row 0,
    the last kv row by none."""
    bad = torch.tensor([*BAD, SKV, 2**31 - 1])
    idx = torch.empty(S, k, dtype=torch.int64)
    for t in range(S):
        n_valid = 0 if t == 0 else 1 if t == 1 else int(torch.randint(2, min(k, SKV - 1) + 1, (1,), generator=gen))
        row = torch.randperm(SKV - 2, generator=gen)[:max(n_valid - 1, 0)] + 1
        row = torch.cat([torch.zeros(min(n_valid, 1), dtype=torch.int64), row])
        if t == 2:
            row[-1] = row[0]  # a duplicate: it counts twice, as in the forward
        pad = bad[torch.randint(0, 4, (k - n_valid,), generator=gen)]
        idx[t] = torch.cat([row, pad])[torch.randperm(k, generator=gen)]
    return idx.int()


def bwd_inputs(spec, gen, device, S: int, SKV: int, sm_scale: float = 0.1):
    """q, kv, indices, the reference forward's out (bf16) and lse, and d_out."""
    at = spec.attention
    q = rand(gen, S, at.heads, at.qk_dim).bfloat16()
    kv = rand(gen, SKV, at.qk_dim).bfloat16()
    idx = bwd_indices(gen, S, SKV, spec.topk.k)
    out, lse = reference.sparse_attention(q, kv, idx, sm_scale, at.v_dim)
    d_out = rand(gen, S, at.heads, at.v_dim).bfloat16()
    return tuple(a.to(device) for a in (q, kv, idx, out.bfloat16(), lse.float(), d_out)) + (sm_scale,)


def check_bwd(kernels, inputs, dq, dkv):
    """Both gradients against the float64 reference; the all-invalid row 0 has dq exactly 0, kv
    rows nobody selects have dkv exactly 0."""
    q, kv, idx, out, lse, d_out, scale = inputs
    ref_dq, ref_dkv = reference.sparse_attention_bwd(*(a.cpu() for a in (q, kv, idx, out, lse, d_out)), scale,
                                                     kernels.spec.attention.v_dim)
    assert_close("sparse_attention_bwd.dq", dq, ref_dq)
    assert_close("sparse_attention_bwd.dkv", dkv, ref_dkv)
    assert torch.all(dq[0] == 0), "a row without a valid index has dq 0"
    flat = idx.cpu().long().flatten()
    used = torch.zeros(kv.shape[0], dtype=torch.bool)
    used[flat[(flat >= 0) & (flat < kv.shape[0])]] = True
    assert not used.all() and torch.all(dkv.cpu()[~used] == 0), "rows nobody selects have dkv exactly 0"


def poisoned(spec, inputs):
    return workload("sparse_attention_bwd").poisoned_outputs(spec, inputs)


# ------------------------------------------------------------------------------------------------
# the reference: its explicit formulas are the gradients of the float64 forward

class _ReferenceAttention(torch.autograd.Function):
    """out of reference.sparse_attention, with reference.sparse_attention_bwd as its backward."""

    @staticmethod
    def forward(ctx, q, kv, idx, sm_scale, v_dim):
        out, lse = reference.sparse_attention(q, kv, idx, sm_scale, v_dim)
        ctx.save_for_backward(q, kv, idx, out, lse)
        ctx.sm_scale, ctx.v_dim = sm_scale, v_dim
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, kv, idx, out, lse = ctx.saved_tensors
        dq, dkv = reference.sparse_attention_bwd(q, kv, idx, out, lse, d_out, ctx.sm_scale, ctx.v_dim)
        return dq, dkv, None, None, None


def test_reference_backward_is_the_gradient_of_the_reference_forward():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 7, dtype=torch.float64, generator=g, requires_grad=True)
    kv = torch.randn(6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.tensor([[0, 5, -1, 2], [1, 2, 3, 4], [6, 3, 0, 2**31 - 1]], dtype=torch.int32)  # 6 = SKV: invalid
    assert torch.autograd.gradcheck(lambda a, b: _ReferenceAttention.apply(a, b, idx, 0.7, 5), (q, kv))


# ------------------------------------------------------------------------------------------------
# kernels against the reference

CASES = [
    # S, SKV, heads, qk_dim, v_dim, k
    (5, 61, 3, 80, 48, 37),
    (4, 45, 17, 80, 48, 20),  # heads = 16 + 1
    (3, 40, 2, 64, 64, 19),  # no rope part
    (3, 70, 5, 576, 512, 33),  # V3.2's dims
]


@pytest.mark.parametrize("S,SKV,H,DQK,DV,K", CASES,
                         ids=[f"S{c[0]}-SKV{c[1]}-H{c[2]}-DQK{c[3]}-DV{c[4]}-K{c[5]}" for c in CASES])
def test_sparse_attention_bwd_matches_reference(device, backend, gen, S, SKV, H, DQK, DV, K):
    kernels = dsagen.build(make_spec(k=K, heads=H, qk_dim=DQK, v_dim=DV), backend=backend)
    inputs = bwd_inputs(kernels.spec, gen, device, S, SKV)
    bufs = poisoned(kernels.spec, inputs)
    dq, dkv = kernels.sparse_attention_bwd(*inputs, **bufs)
    assert dq.data_ptr() == bufs["dq"].data_ptr() and dkv.data_ptr() == bufs["dkv"].data_ptr()
    check_bwd(kernels, inputs, dq, dkv)


@pytest.mark.parametrize("schedule", [
    {"block_h": 16, "block_n": 16, "num_warps": 4, "num_stages": 2, "deterministic_dkv": 0},
    {"block_h": 32, "block_n": 64, "num_warps": 8, "num_stages": 1, "deterministic_dkv": 1},
], ids=lambda s: "h{block_h}-n{block_n}-det{deterministic_dkv}".format(**s))
def test_sparse_attention_bwd_triton_schedules_agree(device, gen, schedule):
    kernels = dsagen.build(make_spec(k=70, heads=33), schedules={"sparse_attention_bwd": schedule})
    inputs = bwd_inputs(kernels.spec, gen, device, 3, 90)
    check_bwd(kernels, inputs, *kernels.sparse_attention_bwd(*inputs, **poisoned(kernels.spec, inputs)))


def test_deterministic_build_gives_the_same_bytes(device, backend, gen):
    kernels = dsagen.build(make_spec(k=23, heads=17), backend=backend, deterministic=True)
    assert kernels.resolve("sparse_attention_bwd", 6, 50, device.type).point["deterministic_dkv"] == 1
    inputs = bwd_inputs(kernels.spec, gen, device, 6, 50)
    first = kernels.sparse_attention_bwd(*inputs)
    second = kernels.sparse_attention_bwd(*inputs, **poisoned(kernels.spec, inputs))
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    check_bwd(kernels, inputs, *first)


def test_fixed_point_dkv_is_as_close_as_the_float_atomics(device, gen):
    """The int64 fixed-point sum loses nothing visible in bf16 next to the fp32 atomic sum."""
    spec = make_spec(k=29, heads=5)
    inputs = bwd_inputs(spec, gen, device, 5, 40, sm_scale=0.3)
    plain = dsagen.build(spec).sparse_attention_bwd(*inputs)
    fixed = dsagen.build(spec, deterministic=True).sparse_attention_bwd(*inputs)
    assert torch.equal(plain[0], fixed[0])  # dq has no atomics
    close = (plain[1].float() - fixed[1].float()).abs() <= 2**-7 * plain[1].float().abs()
    assert close.all(), "fixed-point and fp32 dkv differ by more than one bf16 rounding"


def selected_rows(idx: torch.Tensor, skv: int) -> torch.Tensor:
    """[SKV] bool: the kv rows that the query rows of idx select (valid indices only)."""
    flat = idx.cpu().long().flatten()
    rows = torch.zeros(skv, dtype=torch.bool)
    rows[flat[(flat >= 0) & (flat < skv)]] = True
    return rows


@pytest.mark.parametrize("source", ["d_out", "kv"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_nan_reaches_exactly_the_gradients_it_enters(device, backend, gen, deterministic, source):
    """A NaN in one token's d_out makes dq NaN in that (token, head) and dkv NaN in the rows the
    token selects, whole rows; a NaN in a kv row (after the forward) makes that row's dkv NaN and the
    dq of the tokens selecting it. Everything else matches the float64 reference."""
    kernels = dsagen.build(make_spec(k=9, heads=3), backend=backend, deterministic=deterministic)
    q, kv, idx, out, lse, d_out, scale = bwd_inputs(kernels.spec, gen, device, 5, 30)
    if source == "d_out":
        d_out[2, 1, 5] = math.nan
        nan_tokens, nan_rows = [2], selected_rows(idx[2], kv.shape[0])
    else:
        kv[7, 60] = math.nan  # a rope column (dP, which reads the first V_DIM, stays finite)
        idx[3, 4] = 7
        nan_tokens, nan_rows = (idx.cpu() == 7).any(1).nonzero().flatten().tolist(), torch.arange(30) == 7
    inputs = (q, kv, idx, out, lse, d_out, scale)
    dq, dkv = kernels.sparse_attention_bwd(*inputs, **poisoned(kernels.spec, inputs))
    ref_dq, ref_dkv = reference.sparse_attention_bwd(*(a.cpu() for a in inputs[:6]), scale, 48)
    assert nan_rows.any() and not nan_rows.all()
    assert torch.equal(torch.isnan(ref_dkv), nan_rows[:, None].expand_as(ref_dkv)), "the reference's NaN rows"
    assert torch.equal(torch.isnan(dkv).cpu(), torch.isnan(ref_dkv)), "NaN exactly in those rows"
    assert_close("sparse_attention_bwd.dkv", dkv[~nan_rows.to(device)], ref_dkv[~nan_rows])
    assert torch.isnan(ref_dq).flatten(1).any(1).nonzero().flatten().tolist() == nan_tokens
    assert torch.equal(torch.isnan(dq).cpu(), torch.isnan(ref_dq))
    finite = ~torch.isnan(ref_dq)
    assert_close("sparse_attention_bwd.dq", dq.cpu()[finite], ref_dq[finite])


def test_noncontiguous_inputs_and_the_scale_argument(device, backend, gen):
    spec = make_spec(k=21, heads=5, sm_scale=0.13523)
    kernels = dsagen.build(spec, backend=backend)
    q, kv, idx, out, lse, d_out, _ = bwd_inputs(spec, gen, device, 4, 55, sm_scale=0.13523)
    wide = lambda t, extra: torch.cat([t, torch.zeros_like(t)[..., :extra]], -1)[..., :t.shape[-1]]  # noqa: E731
    q_nc = torch.stack([q, q], 1)[:, 1]  # stride over tokens doubled
    kv_nc = wide(kv, 16)
    out_nc, do_nc = wide(out, 8), wide(d_out, 8)
    lse_nc = torch.stack([lse, lse], 2)[..., 0].transpose(0, 1).contiguous().transpose(0, 1)  # [S, H], stride (1, S)
    idx_nc = torch.stack([idx, idx], 1)[:, 0]
    for t in (q_nc, kv_nc, out_nc, do_nc, idx_nc):
        assert not t.is_contiguous()
    with pytest.raises(ValueError, match="^lse"):  # its last dimension is strided
        kernels.sparse_attention_bwd(q_nc, kv_nc, idx_nc, out_nc, lse_nc, do_nc)
    inputs = (q_nc, kv_nc, idx_nc, out_nc, lse, do_nc, 0.13523)
    check_bwd(kernels, inputs, *kernels.sparse_attention_bwd(*inputs[:6]))  # the spec's scale
    out05, lse05 = reference.sparse_attention(q.cpu(), kv.cpu(), idx.cpu(), 0.05, 48)
    inputs = (q_nc, kv_nc, idx_nc, out05.bfloat16().to(device), lse05.float().to(device), do_nc, 0.05)
    check_bwd(kernels, inputs, *kernels.sparse_attention_bwd(*inputs))  # an explicit scale wins


def test_no_query_and_no_kv_row(device, backend, gen):
    kernels = dsagen.build(make_spec(k=7, heads=3), backend=backend)
    q, kv, idx, out, lse, d_out, scale = bwd_inputs(kernels.spec, gen, device, 3, 20)
    dq, dkv = kernels.sparse_attention_bwd(q[:0], kv, idx[:0], out[:0], lse[:0], d_out[:0], scale)
    assert dq.shape == (0, 3, 80) and torch.all(dkv == 0) and dkv.shape == (20, 80)
    dq, dkv = kernels.sparse_attention_bwd(q, kv[:0], idx, out, lse, d_out, scale)
    assert torch.all(dq == 0) and dkv.shape == (0, 80)


# ------------------------------------------------------------------------------------------------
# the workload the tuner and `dsagen bench` use

def test_workload_check_naive_and_a_wrong_result(device, gen):
    spec = make_spec(k=16, heads=4)
    op = get_op("sparse_attention_bwd")
    inputs = workload(op).inputs(spec, 7, 40, device, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    kernels = dsagen.build(spec)
    result = kernels.sparse_attention_bwd(*inputs, **workload(op).poisoned_outputs(spec, inputs))
    rows = torch.tensor([0, 3, 6])
    assert "dkv on" in workload(op).check(spec, inputs, result, rows)
    workload(op).check(spec, inputs, workload(op).naive(spec, inputs)(), rows)  # the naive baseline is right too
    wrong = result[1].clone()
    checked = inputs[2][rows].flatten()
    wrong[checked[checked < 40][0]] *= -1  # a selected row (the workload pads with the invalid SKV = 40)
    with pytest.raises(Mismatch, match="dkv"):
        workload(op).check(spec, inputs, (result[0], wrong), rows)
    flops, _ = op.cost(spec).evaluate({"S": 7, "SKV": 40})
    assert flops == 2 * 7 * 4 * 16 * (3 * 80 + 2 * 48)


# ------------------------------------------------------------------------------------------------
# bad arguments are refused before any launch, naming the argument

def test_bad_arguments_name_the_argument(device):
    kernels = dsagen.build(make_spec(k=7, heads=3))
    bf, i32, f32 = torch.bfloat16, torch.int32, torch.float32
    S, SKV = 4, 10

    def args(**change):
        base = {"q": torch.zeros(S, 3, 80, dtype=bf), "kv": torch.zeros(SKV, 80, dtype=bf),
                "indices": torch.zeros(S, 7, dtype=i32), "out": torch.zeros(S, 3, 48, dtype=bf),
                "lse": torch.zeros(S, 3, dtype=f32), "d_out": torch.zeros(S, 3, 48, dtype=bf)}
        base.update(change)
        return [v.to(device) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v for v in base.values()]

    cases = [
        ("q", args(q=torch.zeros(S, 3, 80, dtype=f32))),
        ("q", args(q=[[1.0]])),
        ("kv", args(kv=torch.zeros(SKV, 81, dtype=bf))),
        ("indices", args(indices=torch.zeros(S, 8, dtype=i32))),
        ("indices", args(indices=torch.zeros(S, 7, dtype=torch.int64))),
        ("out", args(out=torch.zeros(S, 3, 80, dtype=bf))),
        ("lse", args(lse=torch.zeros(S, 3, dtype=bf))),
        ("d_out", args(d_out=torch.zeros(S + 1, 3, 48, dtype=bf))),
        ("d_out", args(d_out=torch.zeros(S, 3, 48, dtype=bf, device="meta"))),
    ]
    for name, call_args in cases:
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            kernels.sparse_attention_bwd(*call_args)
    with pytest.raises(ValueError, match=r"^sm_scale=-1"):
        kernels.sparse_attention_bwd(*args(), -1.0)
    with pytest.raises(ValueError, match=r"^dq\b"):
        kernels.sparse_attention_bwd(*args(), dq=torch.zeros(S, 3, 48, dtype=bf, device=device))
    with pytest.raises(ValueError, match=r"^dkv\b"):
        kernels.sparse_attention_bwd(*args(), dkv=torch.zeros(SKV, 80, dtype=f32, device=device))
