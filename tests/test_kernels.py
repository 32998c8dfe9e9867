"""Every generated kernel against the float64 reference: odd shapes, poisoned outputs, adversarial
indices and windows, heavy ties, non-contiguous inputs, several schedules per kernel."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from dsagen.ops import semantic_hash
import dsagen
from dsagen import reference
from dsagen.verify import Mismatch, assert_close, assert_topk

INVALID = (-(2**31), -1)  # plus SKV and 2**31 - 1, which depend on the problem


def make_spec(ix_heads=3, ix_dim=50, ix_dtype="bf16", k=7, heads=3, qk_dim=80, v_dim=48, sm_scale=None):
    return dsagen.Spec(
        indexer=dsagen.IndexerSpec(heads=ix_heads, head_dim=ix_dim, dtype=ix_dtype),
        topk=dsagen.TopKSpec(k=k),
        attention=dsagen.AttentionSpec(heads=heads, qk_dim=qk_dim, v_dim=v_dim, sm_scale=sm_scale),
    )


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen)


def windows(gen, n_q: int, skv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A mix of every window kind: full, empty (ks == ke and ks > ke), partial, single key, causal,
    and out-of-range bounds that the kernels clamp to [0, SKV)."""
    ks = torch.randint(0, skv, (n_q,), generator=gen)
    ke = torch.clamp(ks + torch.randint(0, skv + 1, (n_q,), generator=gen), max=skv)
    kinds = [(0, skv), (5 % skv, 5 % skv), (skv, 0), (skv - 1, skv), (-3, skv + 7), (0, 1)]
    for t, (a, b) in enumerate(kinds[:n_q]):
        ks[t], ke[t] = a, b
    return ks.int(), ke.int()


def quantize(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Host-side quantization (in-kernel fp8 casts are wrong under the interpreter)."""
    if dtype == "fp8_e4m3":
        return x.clamp(-448, 448).to(torch.float8_e4m3fn)
    return x.to(torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# indexer

INDEXER_CASES = [
    # S, SKV, heads, head_dim, dtype
    (1, 1, 1, 1, "bf16"),
    (5, 37, 3, 50, "bf16"),
    (17, 130, 16, 128, "fp8_e4m3"),
    (33, 301, 64, 128, "fp8_e4m3"),
    (9, 70, 64, 128, "bf16"),
]


@pytest.mark.parametrize("S,SKV,H,D,dtype", INDEXER_CASES,
                         ids=[f"S{c[0]}-SKV{c[1]}-H{c[2]}-D{c[3]}-{c[4]}" for c in INDEXER_CASES])
@pytest.mark.parametrize("with_scale", [True, False], ids=["kscale", "nokscale"])
def test_indexer_matches_reference(device, backend, gen, S, SKV, H, D, dtype, with_scale):
    spec = make_spec(ix_heads=H, ix_dim=D, ix_dtype=dtype)
    kernels = dsagen.build(spec, backend=backend)
    q = quantize(rand(gen, S, H, D) * 2, dtype).to(device)
    k = quantize(rand(gen, SKV, D) * 2, dtype).to(device)
    k_scale = (torch.rand(SKV, generator=gen) + 0.5).to(device) if with_scale else None
    w = rand(gen, S, H).to(device)
    ks, ke = (t.to(device) for t in windows(gen, S, SKV))
    out = torch.full((S, SKV), math.nan, device=device)
    got = kernels.indexer(q, k, k_scale, w, ks, ke, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = reference.indexer(q.cpu(), k.cpu(), None if k_scale is None else k_scale.cpu(), w.cpu(), ks.cpu(), ke.cpu())
    assert_close(f"indexer.logits.{dtype}", got, ref)


INDEXER_SCHEDULES = [
    {"block_m": 1, "block_h": 16, "block_n": 32, "num_warps": 4, "num_stages": 1},
    {"block_m": 64, "block_h": 1, "block_n": 64, "num_warps": 4, "num_stages": 3},
    {"block_m": 4, "block_h": 8, "block_n": 256, "num_warps": 8, "num_stages": 2},
]


@pytest.mark.parametrize("schedule", INDEXER_SCHEDULES, ids=lambda s: "m{block_m}-h{block_h}-n{block_n}".format(**s))
def test_indexer_schedules_agree(device, gen, schedule):
    spec = make_spec(ix_heads=16, ix_dim=128, ix_dtype="fp8_e4m3")
    kernels = dsagen.build(spec, schedules={"indexer": schedule})
    assert kernels.resolve("indexer").point == schedule
    S, SKV = 19, 333
    q = quantize(rand(gen, S, 16, 128), "fp8_e4m3").to(device)
    k = quantize(rand(gen, SKV, 128), "fp8_e4m3").to(device)
    w, k_scale = rand(gen, S, 16).to(device), torch.rand(SKV, generator=gen).to(device)
    ks, ke = (t.to(device) for t in windows(gen, S, SKV))
    got = kernels.indexer(q, k, k_scale, w, ks, ke)
    assert_close("indexer.logits.fp8_e4m3", got, reference.indexer(q.cpu(), k.cpu(), k_scale.cpu(), w.cpu(), ks.cpu(), ke.cpu()))


def test_indexer_noncontiguous_inputs(device, backend, gen):
    spec = make_spec(ix_heads=3, ix_dim=50)
    kernels = dsagen.build(spec, backend=backend)
    S, SKV = 11, 45
    q = rand(gen, S, 5, 64).bfloat16().to(device)[:, 1:4, :50]  # head and token strides padded
    k = rand(gen, SKV, 2, 64).bfloat16().to(device)[:, 1, :50]
    w = rand(gen, S, 7).to(device)[:, 2:5]
    k_scale = torch.rand(2 * SKV, generator=gen).to(device)[::2].contiguous()
    ks, ke = (t.to(device) for t in windows(gen, S, SKV))
    assert not q.is_contiguous() and not k.is_contiguous() and not w.is_contiguous()
    got = kernels.indexer(q, k, k_scale, w, ks, ke)
    assert_close("indexer.logits.bf16", got, reference.indexer(q.cpu(), k.cpu(), k_scale.cpu(), w.cpu(), ks.cpu(), ke.cpu()))


# ------------------------------------------------------------------------------------------------
# top-k

TOPK_CASES = [
    # S, SKV, k
    (7, 50, 1),
    (9, 37, 7),
    (6, 301, 100),
    (4, 4099, 2048),
    (3, 2047, 2048),
]


def _logits_with_windows(gen, S, SKV, device, ties: bool):
    if ties:  # a handful of distinct values: the k-th value is shared by many keys
        x = torch.randint(-2, 3, (S, SKV), generator=gen).float()
        x[0] = 1.0  # one row entirely equal
    else:
        x = rand(gen, S, SKV)
    x[-1, ::3] = -math.inf  # -inf inside a window is still a candidate
    ks, ke = windows(gen, S, SKV)
    return x.to(device), ks.to(device), ke.to(device)


@pytest.mark.parametrize("S,SKV,k", TOPK_CASES, ids=[f"S{c[0]}-SKV{c[1]}-K{c[2]}" for c in TOPK_CASES])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "heavy-ties"])
def test_topk_exact(device, backend, gen, S, SKV, k, ties):
    spec = make_spec(k=k)
    kernels = dsagen.build(spec, backend=backend)
    x, ks, ke = _logits_with_windows(gen, S, SKV, device, ties)
    out = torch.full((S, k), -7, dtype=torch.int32, device=device)  # poison: neither valid nor -1
    got = kernels.topk(x, ks, ke, out=out)
    assert_topk(got, x, ks, ke, k)


@pytest.mark.parametrize("schedule", [{"block_n": 256, "radix_bits": 8, "num_warps": 4, "resident_max": 0, "sample": 0},
                                      {"block_n": 512, "radix_bits": 2, "num_warps": 16, "resident_max": 0, "sample": 0},
                                      {"block_n": 256, "radix_bits": 8, "resident_max": 0, "sample": 256,
                                       "candidates": 256, "row_reads": 2},
                                      {"block_n": 256, "radix_bits": 8, "resident_max": 0, "sample": 256,
                                       "candidates": 256, "row_reads": 1},
                                      {"block_n": 1024, "radix_bits": 4, "resident_max": 0, "sample": 1024,
                                       "candidates": 2048, "num_warps": 8, "row_reads": 2},
                                      {"block_n": 512, "radix_bits": 4, "resident_max": 0, "sample": 2048,
                                       "candidates": 4096, "num_warps": 8, "row_reads": 1},
                                      {"block_n": 512, "radix_bits": 4, "resident_max": 4096, "resident_warps": 8}],
                         ids=lambda s: "n{block_n}-r{radix_bits}-res{resident_max}-smp{sample}-reads{row_reads}".format(
                             **{"sample": 512, "row_reads": 1, **s}))
def test_topk_schedules_agree(device, gen, schedule):
    kernels = dsagen.build(make_spec(k=100), schedules={"topk": schedule})
    x, ks, ke = _logits_with_windows(gen, 5, 1031, device, ties=True)
    assert_topk(kernels.topk(x, ks, ke), x, ks, ke, 100)
    x, ks, ke = _logits_with_windows(gen, 4, 5000, device, ties=False)  # streams when > resident_max
    assert_topk(kernels.topk(x, ks, ke), x, ks, ke, 100)


@pytest.mark.parametrize("row_reads", [1, 2], ids=lambda r: f"reads{r}")
def test_topk_bracket_settles_plain_rows_and_falls_back_on_a_full_bin(device, gen, row_reads):
    """The bracketed path must really carry ordinary rows (their band's or bin's indices are set
    aside in the scratch buffer) and hand a row of one repeated value to the radix passes; both
    stay exact. Calls the generated kernel itself to see its scratch buffer."""
    from dsagen.backends import triton as triton_backend

    if device.type == "cpu" and (problem := triton_backend.interpreter_problem()):
        pytest.skip(problem)
    cap = 256 if row_reads == 2 else 1024  # the one-read band is wider than the two-read bin
    kernels = dsagen.build(make_spec(k=100), schedules={"topk": {"block_n": 256, "sample": 256, "candidates": cap,
                                                                 "resident_max": 0, "row_reads": row_reads}})
    module = triton_backend.load(kernels.path(kernels.resolve("topk", device_type=device.type)), interpret=device.type == "cpu")
    S, SKV = 4, 3001
    x = rand(gen, S, SKV).to(device)
    x[2] = 0.5  # every key equal: the bin or band holds the whole row, more than the candidates cap
    ks = torch.zeros(S, dtype=torch.int32, device=device)
    ke = torch.full((S,), SKV, dtype=torch.int32, device=device)
    out = torch.full((S, 100), -7, dtype=torch.int32, device=device)
    scratch = torch.full((S, cap), -5, dtype=torch.int32, device=device)
    interpreted = device.type == "cpu"
    with triton_backend._jit_helpers_interpreted() if interpreted else contextlib.nullcontext():
        module._topk_kernel[(S,)](x, ks, ke, out, scratch, SKV, x.stride(0), out.stride(0), scratch.stride(0),
                                  **module._constexprs(), num_warps=4)
    assert_topk(out, x, ks, ke, 100)
    used = (scratch != -5).any(dim=1).tolist()
    full = (scratch != -5).all(dim=1).tolist()
    if row_reads == 2:  # the bin is counted first: an overfull one is never written
        assert used == [True, True, False, True], used
    else:  # the band is written as it is found: a plain row's fits, the repeated value's overflows
        assert used == [True] * 4 and full == [False, False, True, False], (used, full)


def test_topk_on_quantized_indexer_logits(device, backend, gen):
    """Real indexer output ties heavily (fp8 products): the selection must stay exact and in bounds."""
    spec = make_spec(ix_heads=4, ix_dim=32, ix_dtype="fp8_e4m3", k=64)
    kernels = dsagen.build(spec, backend=backend)
    S, SKV = 8, 700
    q = quantize(torch.randint(-2, 3, (S, 4, 32), generator=gen).float(), "fp8_e4m3").to(device)
    k = quantize(torch.randint(-2, 3, (SKV, 32), generator=gen).float(), "fp8_e4m3").to(device)
    w = torch.ones(S, 4, device=device)
    ks = torch.zeros(S, dtype=torch.int32, device=device)
    ke = torch.arange(SKV - S + 1, SKV + 1, dtype=torch.int32, device=device)
    logits = kernels.indexer(q, k, None, w, ks, ke)
    assert_topk(kernels.topk(logits, ks, ke), logits, ks, ke, 64)


def test_topk_noncontiguous_logits(device, backend, gen):
    kernels = dsagen.build(make_spec(k=7), backend=backend)
    big = rand(gen, 6, 2 * 97).to(device)
    x = big[:, 10:107]
    ks, ke = (t.to(device) for t in windows(gen, 6, 97))
    assert_topk(kernels.topk(x, ks, ke), x, ks, ke, 7)


# ------------------------------------------------------------------------------------------------
# sparse attention

ATTN_CASES = [
    # S, SKV, heads, qk_dim, v_dim, k
    (3, 37, 1, 80, 48, 7),
    (5, 130, 3, 576, 512, 100),
    (4, 300, 16, 576, 512, 33),
    (2, 2100, 128, 576, 512, 2048),
    (3, 50, 7, 64, 64, 16),  # no rope part
]


def sparse_indices(gen, S: int, SKV: int, k: int) -> torch.Tensor:
    """Distinct valid indices with every kind of invalid one mixed in: -2**31, -1, SKV, 2**31-1.
    Row 0 is all invalid, row 1 has a single valid index, the rest a random valid count."""
    idx = torch.empty(S, k, dtype=torch.int64)
    bad = torch.tensor([-(2**31), -1, SKV, 2**31 - 1])
    for t in range(S):
        n_valid = 0 if t == 0 else 1 if t == 1 else int(torch.randint(1, min(k, SKV) + 1, (1,), generator=gen))
        row = torch.randperm(SKV, generator=gen)[:n_valid]
        pad = bad[torch.randint(0, 4, (k - n_valid,), generator=gen)]
        row = torch.cat([row, pad])[torch.randperm(k, generator=gen)]
        idx[t] = row
    return idx.int()


def _check_attention(kernels, q, kv, idx, sm_scale=None):
    S, H = q.shape[:2]
    at = kernels.spec.attention
    out = torch.full((S, H, at.v_dim), math.nan, dtype=torch.bfloat16, device=q.device)
    lse = torch.full((S, H), math.nan, dtype=torch.float32, device=q.device)
    got_out, got_lse = kernels.sparse_attention(q, kv, idx, sm_scale, out=out, lse=lse)
    scale = sm_scale if sm_scale is not None else at.softmax_scale
    ref_out, ref_lse = reference.sparse_attention(q.cpu(), kv.cpu(), idx.cpu(), scale, at.v_dim)
    assert_close("sparse_attention.out", got_out, ref_out)
    assert_close("sparse_attention.lse", got_lse, ref_lse)
    return got_out, got_lse


@pytest.mark.parametrize("S,SKV,H,DQK,DV,K", ATTN_CASES,
                         ids=[f"S{c[0]}-SKV{c[1]}-H{c[2]}-DQK{c[3]}-DV{c[4]}-K{c[5]}" for c in ATTN_CASES])
def test_sparse_attention_matches_reference(device, backend, gen, S, SKV, H, DQK, DV, K):
    kernels = dsagen.build(make_spec(k=K, heads=H, qk_dim=DQK, v_dim=DV), backend=backend)
    q = rand(gen, S, H, DQK).bfloat16().to(device)
    kv = rand(gen, SKV, DQK).bfloat16().to(device)
    idx = sparse_indices(gen, S, SKV, K).to(device)
    out, lse = _check_attention(kernels, q, kv, idx)
    assert torch.all(out[0] == 0) and torch.all(torch.isposinf(lse[0])), "all-invalid row: out 0, lse +inf"


ATTN_SCHEDULES = [
    {"block_h": 16, "block_n": 16, "num_warps": 4, "num_stages": 1, "v_split": 1},
    {"block_h": 32, "block_n": 32, "num_warps": 4, "num_stages": 2, "v_split": 2},
    {"block_h": 16, "block_n": 128, "num_warps": 8, "num_stages": 1, "v_split": 4},
    {"block_h": 32, "block_n": 16, "num_warps": 4, "num_stages": 2, "v_split": 1, "index_prefetch": 1},
]


@pytest.mark.parametrize("schedule", ATTN_SCHEDULES, ids=lambda s: "h{block_h}-n{block_n}-vs{v_split}-ip{index_prefetch}".format(**{"index_prefetch": 0, **s}))
def test_sparse_attention_schedules_agree(device, gen, schedule):
    kernels = dsagen.build(make_spec(k=77, heads=40, qk_dim=576, v_dim=512), schedules={"sparse_attention": schedule})
    S, SKV = 3, 200
    q = rand(gen, S, 40, 576).bfloat16().to(device)
    kv = rand(gen, SKV, 576).bfloat16().to(device)
    _check_attention(kernels, q, kv, sparse_indices(gen, S, SKV, 77).to(device))


def test_sparse_attention_scale_parameter_and_noncontiguous(device, backend, gen):
    kernels = dsagen.build(make_spec(k=20, heads=5, qk_dim=576, v_dim=512, sm_scale=0.13523), backend=backend)
    S, SKV = 4, 90
    q = rand(gen, S, 8, 640).bfloat16().to(device)[:, 2:7, :576]
    kv = rand(gen, SKV, 700).bfloat16().to(device)[:, 100:676]
    idx = sparse_indices(gen, S, SKV, 40).to(device)[:, ::2]
    assert not q.is_contiguous() and not kv.is_contiguous() and not idx.is_contiguous()
    with pytest.raises(ValueError, match="indices"):  # last dim of idx has stride 2
        kernels.sparse_attention(q, kv, idx)
    idx = idx.contiguous()
    _check_attention(kernels, q, kv, idx)  # the spec's 0.13523
    _check_attention(kernels, q, kv, idx, sm_scale=0.05)  # an explicit scale wins


def test_sparse_attention_detects_wrong_output(device, backend, gen):
    """The checker itself must fail on a wrong kernel: a guard against tests that cannot fail."""
    kernels = dsagen.build(make_spec(k=7, heads=3, qk_dim=80, v_dim=48), backend=backend)
    q = rand(gen, 3, 3, 80).bfloat16().to(device)
    kv = rand(gen, 37, 80).bfloat16().to(device)
    idx = sparse_indices(gen, 3, 37, 7).to(device)
    out, lse = kernels.sparse_attention(q, kv, idx)
    ref_out, ref_lse = reference.sparse_attention(q.cpu(), kv.cpu(), idx.cpu(), kernels.spec.attention.softmax_scale, 48)
    with pytest.raises(Mismatch):
        assert_close("sparse_attention.out", out * 1.05, ref_out)
    poisoned = lse.clone()
    poisoned[2, 1] = math.nan
    with pytest.raises(Mismatch, match="NaN"):
        assert_close("sparse_attention.lse", poisoned, ref_lse)


# ------------------------------------------------------------------------------------------------
# the three composed

def test_dsa_composes_the_three_stages(device, backend, gen):
    spec = make_spec(ix_heads=4, ix_dim=64, ix_dtype="fp8_e4m3", k=24, heads=16, qk_dim=576, v_dim=512)
    kernels = dsagen.build(spec, backend=backend)
    S, SKV = 6, 150
    iq = quantize(rand(gen, S, 4, 64), "fp8_e4m3").to(device)
    ik = quantize(rand(gen, SKV, 64), "fp8_e4m3").to(device)
    k_scale = torch.rand(SKV, generator=gen).to(device)
    w = rand(gen, S, 4).to(device)
    ks = torch.zeros(S, dtype=torch.int32, device=device)
    ke = torch.tensor([0, 1, 20, 100, 149, 150], dtype=torch.int32, device=device)  # causal-like
    q = rand(gen, S, 16, 576).bfloat16().to(device)
    kv = rand(gen, SKV, 576).bfloat16().to(device)
    res = kernels.dsa(q, kv, iq, ik, k_scale, w, ks, ke)
    logits = reference.indexer(iq.cpu(), ik.cpu(), k_scale.cpu(), w.cpu(), ks.cpu(), ke.cpu()).float()
    assert_topk(res.indices, logits, ks, ke, 24)
    ref_out, ref_lse = reference.sparse_attention(q.cpu(), kv.cpu(), res.indices.cpu(), spec.attention.softmax_scale, 512)
    assert_close("sparse_attention.out", res.out, ref_out)
    assert_close("sparse_attention.lse", res.lse, ref_lse)
    assert torch.isposinf(res.lse[0]).all() and (res.indices[0] == -1).all()  # empty window


# ------------------------------------------------------------------------------------------------
# bad tensors are refused before any launch, naming the argument

def test_bad_tensors_name_the_argument(device):
    kernels = dsagen.build(make_spec(ix_heads=3, ix_dim=50, k=7, heads=3, qk_dim=80, v_dim=48))
    bf, i32 = torch.bfloat16, torch.int32
    q = torch.zeros(4, 3, 50, dtype=bf, device=device)
    k = torch.zeros(10, 50, dtype=bf, device=device)
    w = torch.zeros(4, 3, device=device)
    ks = torch.zeros(4, dtype=i32, device=device)
    cases = [
        ("q", lambda: kernels.indexer(q.float(), k, None, w, ks, ks)),  # dtype
        ("q", lambda: kernels.indexer(q[:, :2], k, None, w, ks, ks)),  # heads
        ("k", lambda: kernels.indexer(q, k[:, :49], None, w, ks, ks)),  # head_dim
        ("k_scale", lambda: kernels.indexer(q, k, torch.zeros(9, device=device), w, ks, ks)),
        ("weights", lambda: kernels.indexer(q, k, None, w.to(bf), ks, ks)),
        ("ks", lambda: kernels.indexer(q, k, None, w, ks.long(), ks)),
        ("ke", lambda: kernels.indexer(q, k, None, w, ks, ks[:3])),
        ("q", lambda: kernels.indexer(q.transpose(1, 2).contiguous().transpose(1, 2), k, None, w, ks, ks)),
        ("k", lambda: kernels.indexer(q, k.to("meta"), None, w, ks, ks)),  # device
        ("out", lambda: kernels.indexer(q, k, None, w, ks, ks, out=torch.zeros(4, 9, device=device))),
        ("logits", lambda: kernels.topk(torch.zeros(4, 10, dtype=torch.float64, device=device), ks, ks)),
        ("out", lambda: kernels.topk(torch.zeros(4, 10, device=device), ks, ks,
                                     out=torch.zeros(4, 6, dtype=i32, device=device))),
        ("indices", lambda: kernels.sparse_attention(torch.zeros(4, 3, 80, dtype=bf, device=device),
                                                     torch.zeros(10, 80, dtype=bf, device=device),
                                                     torch.zeros(4, 8, dtype=i32, device=device))),
        ("kv", lambda: kernels.sparse_attention(torch.zeros(4, 3, 80, dtype=bf, device=device),
                                                torch.zeros(10, 81, dtype=bf, device=device),
                                                torch.zeros(4, 7, dtype=i32, device=device))),
        ("sm_scale", lambda: kernels.sparse_attention(torch.zeros(4, 3, 80, dtype=bf, device=device),
                                                      torch.zeros(10, 80, dtype=bf, device=device),
                                                      torch.zeros(4, 7, dtype=i32, device=device), -1.0)),
        ("q", lambda: kernels.sparse_attention([[1.0]], None, None)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            call()


# ------------------------------------------------------------------------------------------------
# fused indexer + top-k (Triton): selection while the logits are computed, never written

FUSED_CASES = [
    # S, SKV, heads, head_dim, dtype, k
    (9, 300, 3, 50, "bf16", 7),
    (6, 701, 16, 128, "fp8_e4m3", 33),
    (4, 1500, 64, 128, "fp8_e4m3", 100),
    (5, 90, 64, 128, "bf16", 128),  # k larger than most windows: take-all rows and -1 padding
]


FUSED_SCHEDULES = [None, {"block_m": 4, "block_h": 4, "block_n": 64, "sample": 128, "candidates": 256}]


@pytest.mark.parametrize("schedule", FUSED_SCHEDULES, ids=["per-row", "rows4"])
@pytest.mark.parametrize("S,SKV,H,D,dtype,k", FUSED_CASES,
                         ids=[f"S{c[0]}-SKV{c[1]}-H{c[2]}-D{c[3]}-{c[4]}-K{c[5]}" for c in FUSED_CASES])
def test_fused_indexer_topk_is_exact(device, gen, S, SKV, H, D, dtype, k, schedule):
    """Integer q, k and power-of-two weights and scales make every logit exact in fp32 whatever the
    summation order, so the fused selection must equal the exact top-k of the float64 reference;
    small integers also tie heavily. Both the per-row kernel and the multi-row one (with the
    per-row kernel finishing its overfull rows) are checked."""
    spec = make_spec(ix_heads=H, ix_dim=D, ix_dtype=dtype, k=k)
    kernels = dsagen.build(spec, schedules={"indexer_topk": schedule} if schedule else None)
    q = quantize(torch.randint(-3, 4, (S, H, D), generator=gen).float(), dtype).to(device)
    kk = quantize(torch.randint(-3, 4, (SKV, D), generator=gen).float(), dtype).to(device)
    w = (2.0 ** torch.randint(-3, 2, (S, H), generator=gen).float()) * torch.randint(-1, 2, (S, H), generator=gen).float()
    scale = 2.0 ** torch.randint(-1, 2, (SKV,), generator=gen).float()
    ks, ke = windows(gen, S, SKV)
    out = torch.full((S, k), -7, dtype=torch.int32, device=device)
    got = kernels.indexer_topk(q, kk, scale.to(device), w.to(device), ks.to(device), ke.to(device), out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = reference.indexer(q.cpu(), kk.cpu(), scale, w, ks, ke)
    assert_topk(got, ref.float(), ks, ke, k)


def test_fused_rows_kernel_settles_plain_rows(device, gen):
    """The multi-row kernel must really settle ordinary rows (not leave everything to the per-row
    kernel): its settled flags are read after calling it directly, and the full launcher's
    answer keeps the top-k contract against the float64 logits (fp8 tolerance)."""
    from dsagen.backends import triton as triton_backend

    if device.type == "cpu" and (problem := triton_backend.interpreter_problem()):
        pytest.skip(problem)
    spec = make_spec(ix_heads=8, ix_dim=32, ix_dtype="bf16", k=20)
    schedule = {"block_m": 4, "block_h": 4, "block_n": 64, "sample": 128, "candidates": 256}
    kernels = dsagen.build(spec, schedules={"indexer_topk": schedule})
    S, SKV = 6, 700
    q = torch.randn(S, 8, 32, generator=gen).bfloat16().to(device)
    kk = torch.randn(SKV, 32, generator=gen).bfloat16().to(device)
    w = torch.randn(S, 8, generator=gen).to(device)
    ks = torch.zeros(S, dtype=torch.int32, device=device)
    ke = torch.tensor([700, 650, 10, 699, 400, 700], dtype=torch.int32, device=device)  # row 2: take all
    poisoned = torch.full((S, 20), -7, dtype=torch.int32, device=device)
    got = kernels.indexer_topk(q, kk, None, w, ks, ke, out=poisoned)
    ref = reference.indexer(q.cpu(), kk.cpu(), None, w.cpu(), ks.cpu(), ke.cpu())
    assert_topk(got.cpu(), ref.float(), ks.cpu(), ke.cpu(), 20, tolerance=1e-3)
    module = triton_backend.load(kernels.path(kernels.resolve("indexer_topk", device_type=device.type)),
                                 interpret=device.type == "cpu")
    settled = torch.full((S,), -1, dtype=torch.int32, device=device)
    out = torch.full((S, 20), -7, dtype=torch.int32, device=device)
    cand_idx = torch.empty((S, 256), dtype=torch.int32, device=device)
    cand_val = torch.empty((S, 256), dtype=torch.float32, device=device)
    with triton_backend._jit_helpers_interpreted() if device.type == "cpu" else contextlib.nullcontext():
        module._indexer_topk_rows_kernel[(2,)](
            q, kk, kk, w, ks, ke, out, settled, cand_idx, cand_val, S, SKV, q.stride(0), q.stride(1),
            kk.stride(0), w.stride(0), out.stride(0), cand_idx.stride(0),
            **module._rows_constexprs(has_k_scale=False), num_warps=4)
    assert settled.tolist() == [1, 1, 0, 1, 1, 1]


def test_fused_spec_switches_dsa_to_the_fused_path(device, gen):
    spec = dsagen.Spec(indexer=dsagen.IndexerSpec(heads=4, head_dim=32, dtype="bf16"),
                       topk=dsagen.TopKSpec(k=9, fused=True),
                       attention=dsagen.AttentionSpec(heads=3, qk_dim=80, v_dim=48))
    assert semantic_hash(spec, "topk") == semantic_hash(make_spec(k=9), "topk")  # fused is not math
    kernels = dsagen.build(spec)
    S, SKV = 5, 60
    q_idx = quantize(torch.randint(-3, 4, (S, 4, 32), generator=gen).float(), "bf16").to(device)
    k_idx = quantize(torch.randint(-3, 4, (SKV, 32), generator=gen).float(), "bf16").to(device)
    w = torch.ones(S, 4).to(device)
    ks = torch.zeros(S, dtype=torch.int32).to(device)
    ke = torch.arange(SKV - S + 1, SKV + 1, dtype=torch.int32).to(device)
    q = rand(gen, S, 3, 80).bfloat16().to(device)
    kv = rand(gen, SKV, 80).bfloat16().to(device)
    res = kernels.dsa(q, kv, q_idx, k_idx, None, w, ks, ke)
    ref_logits = reference.indexer(q_idx.cpu(), k_idx.cpu(), None, w.cpu(), ks.cpu(), ke.cpu())
    assert_topk(res.indices, ref_logits.float(), ks.cpu(), ke.cpu(), 9)


def test_topk_tolerance_mode_still_rejects_a_wrong_pick():
    x = torch.tensor([[5.0, 4.0, 3.0, -9.0]])
    ks, ke = torch.tensor([0], dtype=torch.int32), torch.tensor([4], dtype=torch.int32)
    assert_topk(torch.tensor([[1, 0]], dtype=torch.int32), x, ks, ke, 2, tolerance=1e-3)
    assert_topk(torch.tensor([[0, 2]], dtype=torch.int32), x + torch.tensor([[0, 0, 0.999, 0]]), ks, ke, 2,
                tolerance=1e-3)  # 3.999 vs 4.0: a rounding-sized miss passes
    with pytest.raises(Mismatch, match="below the 2-th largest"):
        assert_topk(torch.tensor([[0, 3]], dtype=torch.int32), x, ks, ke, 2, tolerance=1e-3)
