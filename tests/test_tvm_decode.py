"""The TVM decode kernels (mla_cache_write, paged_indexer, decode_topk, sparse_decode) beyond the
shared decode tests, which run on both backends: the sm_90 CUDA source of each (compiled with nvcc
when present), CPU schedules far apart, the TVM split-k path, odd head counts and next_n, partial
last pages, invalid slots of every kind into poisoned outputs, every way the decode top-k settles a
row, its sorted slots bitwise equal to Triton's, Triton/TVM parity and a whole decode step."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dsagen
import dsagen.ops.decode_topk_workload as dt
import dsagen.ops.mla_cache_write_workload as mcw
import dsagen.ops.paged_indexer_workload as paged
from dsagen import reference
from dsagen.backends import tvm as tvm_backend
from dsagen.backends.triton import interpreter_problem
from dsagen.cache_formats import MLA_FORMATS, dequantize_mla_rows
from dsagen.decode import decode_windows, positions_to_slots
from dsagen.verify import assert_close, assert_topk, tolerance
from test_decode_step import Batch, serving_spec
from test_decode_topk import TVM_SMALL, make_case as topk_case, make_spec as topk_spec, tie_keys
from test_paged_indexer import make_case, make_spec as indexer_spec
from test_sparse_decode import expected, make_spec as decode_spec, problem
from test_tvm import cpu_points, nvcc_compiles

pytestmark = pytest.mark.skipif(tvm_backend.available() is not None, reason=str(tvm_backend.available()))

ROOT = Path(__file__).resolve().parent.parent
FMT = MLA_FORMATS["deepseek_v32_fp8"]
WIDTH = FMT.latent_dim + FMT.rope_dim


def serving() -> dsagen.Spec:
    return dsagen.load_spec(ROOT / "specs" / "deepseek_v32_serving.toml")


KERNELS = tuple(op.name for op in dsagen.ops.enabled(serving(), "tvm") if op.needs_cache)  # the decode kernels


CUDA_CASES = [
    ("mla_cache_write", None),
    ("paged_indexer", None),
    ("sparse_decode", None),
    ("sparse_decode", {"cuda_k_split": 4, "cuda_block_h": 8, "cuda_block_n": 4, "cuda_threads": 256}),
    ("decode_topk", None),
    ("decode_topk", {"cuda_threads": 128, "cuda_radix_bits": 6, "sorted": 1}),
]


@pytest.mark.parametrize("kernel,schedule", CUDA_CASES, ids=["mla_cache_write", "paged_indexer", "sparse_decode",
                                                             "sparse_decode-split4", "decode_topk",
                                                             "decode_topk-t128-r6"])
def test_cuda_source_for_sm90(kernel, schedule, tmp_path):
    """TVM generates each decode kernel's CUDA source without a GPU (the V3.2 serving spec); nvcc
    compiles it for sm_90 when it is installed."""
    kernels = dsagen.build(serving(), backend="tvm", schedules={kernel: schedule} if schedule else None)
    source = tvm_backend.cuda_source(kernels.path(kernels.resolve(kernel, device_type="cpu")))
    assert '__global__' in source and 'extern "C"' in source
    if kernel == "mla_cache_write":  # int32 and int64 slot mappings, and the encoder probe
        assert all(f" {name}_kernel(" in source for name in ("main", "main_i64", "probe"))
    if kernel == "sparse_decode" and schedule:
        assert " combine_kernel(" in source
    if kernel == "decode_topk":  # ranks from warp ballots, no atomics on the output
        assert "__ballot_sync" in source and "atomicAdd((&(OUT" not in source
    nvcc_compiles(source, tmp_path, kernel)


def test_cuda_source_for_odd_shapes(tmp_path):
    """3 query heads, 5 indexer heads of 40 dims, k = 37, 16-token pages: every kernel still builds
    for sm_90 (heads past the last, partial tiles, the split-k combine, a top-k of odd k)."""
    spec = dsagen.Spec(indexer=dsagen.IndexerSpec(heads=5, head_dim=40), topk=dsagen.TopKSpec(k=37),
                       attention=dsagen.AttentionSpec(heads=3), cache=dsagen.CacheSpec(page_size=16))
    schedules = {"sparse_decode": {"cuda_k_split": 2, "cuda_block_n": 16, "cuda_block_h": 2}}
    kernels = dsagen.build(spec, backend="tvm", schedules=schedules)
    for kernel in KERNELS:
        source = tvm_backend.cuda_source(kernels.path(kernels.resolve(kernel, device_type="cpu")))
        assert '__global__' in source
        nvcc_compiles(source, tmp_path, kernel)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["first", "middle", "last"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_cpu_schedules_far_apart_agree_with_the_reference(kernel, which, gen):
    spec = dsagen.Spec(indexer=dsagen.IndexerSpec(heads=16, head_dim=128), topk=dsagen.TopKSpec(k=150),
                       attention=dsagen.AttentionSpec(heads=20), cache=dsagen.CacheSpec(page_size=16))
    # the CUDA knobs at what a build resolves (a raw default may be illegal for this spec)
    point = cpu_points(spec, kernel, dsagen.build(spec, backend="tvm").resolve(kernel, device_type="cpu").point)[which]
    kernels = dsagen.build(spec, backend="tvm", schedules={kernel: point})
    assert kernels.resolve(kernel, device_type="cpu").point == point
    if kernel == "mla_cache_write":
        n, n_pages = 45, 4
        rows = (torch.randn(n, WIDTH, generator=gen) * torch.exp2(torch.randint(-30, 30, (n, 1), generator=gen))).bfloat16()
        slots = torch.randperm(n_pages * 16 + 30, generator=gen)[:n] - 15  # some negative, some past the cache
        cache = mcw.poison_pattern(n_pages, 16, FMT.bytes_per_token, "cpu")
        want = mcw.expected_cache(spec, rows, slots, cache.clone())
        kernels.mla_cache_write(rows, slots.int(), cache)
        assert torch.equal(cache, want)
    elif kernel == "paged_indexer":
        case = make_case(gen, spec, [300, 17, 1, 129], 3, max_blocks=21)
        out = torch.full((12, 21 * 16), math.nan)
        got = kernels.paged_indexer(*case, out=out)
        assert_close("indexer.logits.fp8_e4m3", got, paged.paged_indexer_reference(*case))
    elif kernel == "decode_topk":  # heavy ties (80 values), a window of the int32 maximum, an empty one
        case = topk_case(gen, [3000, 150, 149, 0, 2**31 - 1], 2, 16, max_blocks=200,
                         values=lambda s: torch.randint(-40, 40, s, generator=gen).float() / 8)
        out = torch.full((5, 2, 150), -7, dtype=torch.int32)
        kernels.decode_topk(*case, out=out)
        assert torch.equal(out, dt.decode_topk_reference(*case, 150, 16))
    else:
        q, cache, idx = problem(gen, 3, 2, 20, 150, 16, [400, 60, 9], all_invalid={(1, 1)})
        idx[0, 0, :70] = -1  # the first split(s) of this token have no valid slot
        out = torch.full((3, 2, 20, FMT.latent_dim), math.nan).bfloat16()
        lse = torch.full((3, 2, 20), math.nan)
        kernels.sparse_decode(q, cache, idx, 0.0721, out=out, lse=lse)
        ref_out, ref_lse = expected(q, cache, idx, 0.0721)
        assert_close("sparse_decode.out", out, ref_out)
        assert_close("sparse_decode.lse", lse, ref_lse)
        assert (out[1, 1] == 0).all() and (lse[1, 1] == math.inf).all()


@pytest.mark.parametrize("heads", [1, 3, 16])
def test_paged_indexer_heads_and_next_n(heads, gen):
    """next_n 1..4, contexts ending inside a page, shorter than next_n, 0 and the int32 extremes,
    unused table entries of every bad kind, poisoned outputs; a strided output inside a wider one."""
    spec = indexer_spec(heads, 40, 16)
    kernels = dsagen.build(spec, backend="tvm")
    for next_n in (1, 2, 3, 4):
        lens = [37, next_n - 1, 0, 16, -(2**31), 2**31 - 1]
        case = make_case(gen, spec, lens, next_n, max_blocks=4)
        wide = torch.full((6 * next_n, 80), math.nan)
        got = kernels.paged_indexer(*case, out=wide[:, 7:71])
        ref = paged.paged_indexer_reference(*case)
        assert_close("indexer.logits.fp8_e4m3", got, ref)
        assert torch.isnan(wide[:, :7]).all() and torch.isnan(wide[:, 71:]).all()
        assert (got[2 * next_n:3 * next_n] == -math.inf).all() and (got[4 * next_n:5 * next_n] == -math.inf).all()


SPLITS = [
    {"cpu_k_split": 1, "cpu_block_n": 16},
    {"cpu_k_split": 2, "cpu_block_n": 32},
    {"cpu_k_split": 4, "cpu_block_n": 16},
]


@pytest.mark.parametrize("schedule", SPLITS, ids=lambda s: f"split{s['cpu_k_split']}-n{s['cpu_block_n']}")
@pytest.mark.parametrize("heads", [1, 3, 16])
def test_sparse_decode_heads_and_splits(heads, schedule, gen):
    """Heads 1/3/16 (one padded head block), k = 71 split 1/2/4 ways (slices without a valid slot,
    all-invalid tokens), partial shuffled pages, invalid slots -2^31, -1, n_slots and 2^31 - 1,
    poisoned outputs."""
    kernels = dsagen.build(decode_spec(heads, 71, 16), backend="tvm", schedules={"sparse_decode": schedule})
    q, cache, idx = problem(gen, 2, 3, heads, 71, 16, [100, 9], all_invalid={(1, 0), (0, 2)})
    idx[0, 1, :40] = -(2**31)
    out = torch.full((2, 3, heads, FMT.latent_dim), math.nan).bfloat16()
    lse = torch.full((2, 3, heads), math.nan)
    kernels.sparse_decode(q, cache, idx, 0.0721, out=out, lse=lse)
    ref_out, ref_lse = expected(q, cache, idx, 0.0721)
    assert_close("sparse_decode.out", out, ref_out)
    assert_close("sparse_decode.lse", lse, ref_lse)
    for b, t in ((1, 0), (0, 2)):
        assert (out[b, t] == 0).all() and (lse[b, t] == math.inf).all()


def test_mla_cache_write_slots_of_every_kind_and_a_partial_last_page(gen):
    """int32 and int64 slot mappings holding every invalid kind (and +-2^40), rows landing in the
    last, partly used page; every other byte keeps the poison."""
    spec = dsagen.Spec(cache=dsagen.CacheSpec(page_size=16))
    kernels = dsagen.build(spec, backend="tvm")
    n_pages = 3
    for dtype, extra in ((torch.int32, []), (torch.int64, [2**40, -(2**40)])):
        bad = [-1, -(2**31), n_pages * 16, 2**31 - 1] + extra
        good = [40, 47, 33, 0, 15]  # the last page: slots 32..47
        slots = torch.tensor(good + bad, dtype=dtype)[torch.randperm(len(good) + len(bad), generator=gen)]
        rows = (torch.randn(slots.numel(), WIDTH, generator=gen) * 50).bfloat16()
        cache = mcw.poison_pattern(n_pages, 16, FMT.bytes_per_token, "cpu")
        want = mcw.expected_cache(spec, rows, slots, cache.clone())
        kernels.mla_cache_write(rows, slots, cache)
        assert torch.equal(cache, want)


def test_triton_and_tvm_agree_on_the_decode_kernels(device, gen):
    """Both backends on the test device, one set of inputs: the written cache bytes are equal, the
    logits and the attention outputs agree within the tolerances."""
    if device.type == "cpu" and (problem_ := interpreter_problem()):
        pytest.skip(problem_)
    spec = serving_spec()
    tri, tvm = dsagen.build(spec, backend="triton"), dsagen.build(spec, backend="tvm")
    batch = Batch(spec, gen, [37, 5, 20], 2, max_blocks=3, device=device)
    slots = torch.arange(batch.rows.shape[0], dtype=torch.int32, device=device)
    caches = [batch.mla_cache.to(device) for _ in range(2)]
    for kernels, cache in zip((tri, tvm), caches):
        kernels.mla_cache_write(batch.rows.to(device), slots, cache)
    assert torch.equal(caches[0], caches[1])
    args = batch.on_device("index_q", "index_cache", "weights", "context_lens", "block_table")
    logits = [kernels.paged_indexer(*args) for kernels in (tri, tvm)]
    assert_close("indexer.logits.fp8_e4m3", logits[1], logits[0].double())
    ks, ke = decode_windows(batch.context_lens.to(device), 2)
    chosen = positions_to_slots(tri.topk(logits[0], ks, ke), batch.block_table.to(device), spec.cache.page_size, 2)
    q = batch.q.to(device)
    outs = [kernels.sparse_decode(q, caches[0], chosen) for kernels in (tri, tvm)]
    assert_close("sparse_decode.out", outs[1][0], outs[0][0].double())
    assert_close("sparse_decode.lse", outs[1][1], outs[0][1].double())


@pytest.mark.parametrize("next_n,context_lens", [(2, [37, 5, 20]), (1, [40, 1]), (4, [9, 33])],
                         ids=["B3-n2", "B2-n1", "B2-n4"])
def test_a_decode_step_on_tvm_matches_the_float64_pipeline(gen, next_n, context_lens):
    """write -> paged indexer -> decode top-k (slots) -> sparse decode, all TVM kernels on the CPU;
    the slots are the canonical ones of the indexer's logits and those of the row top-k."""
    spec = serving_spec()
    kernels = dsagen.build(spec, backend="tvm")
    batch = Batch(spec, gen, context_lens, next_n, max_blocks=3, device="cpu")
    mla_cache = batch.mla_cache.clone()
    kernels.mla_cache_write(batch.rows, torch.arange(batch.rows.shape[0], dtype=torch.int32), mla_cache)
    res = kernels.decode(batch.q, mla_cache, batch.index_q, batch.index_cache, batch.weights, batch.context_lens,
                         batch.block_table)
    logits64 = batch.reference_logits()
    ks, ke = decode_windows(batch.context_lens, next_n)
    logits = kernels.paged_indexer(batch.index_q, batch.index_cache, batch.weights, batch.context_lens,
                                   batch.block_table)
    want = dt.decode_topk_reference(logits, batch.context_lens, batch.block_table, spec.topk.k,
                                    spec.cache.page_size)
    assert torch.equal(res.slots, want)  # by ascending position
    positions = kernels.topk(logits, ks, ke)
    assert_topk(positions, logits64, ks, ke, spec.topk.k, tolerance=tolerance("indexer.logits.fp8_e4m3"))
    slots = positions_to_slots(positions, batch.block_table, spec.cache.page_size, next_n)
    assert torch.equal(res.slots.sort(-1).values, slots.sort(-1).values)  # the same slots, in any order
    rows = dequantize_mla_rows(mla_cache.reshape(-1, FMT.bytes_per_token), FMT)
    B, H = len(context_lens), spec.attention.heads
    ref_out, ref_lse = reference.sparse_attention(batch.q.reshape(B * next_n, H, WIDTH), rows,
                                                  res.slots.reshape(B * next_n, -1), spec.attention.softmax_scale,
                                                  FMT.latent_dim)
    assert_close("sparse_decode.out", res.out.reshape(B * next_n, H, -1), ref_out)
    assert_close("sparse_decode.lse", res.lse.reshape(B * next_n, H), ref_lse)


# -- the decode top-k ----------------------------------------------------------------------------

def cpu_topk_path(window: torch.Tensor, k: int, bits: int, candidates: int) -> str:
    """Which way the TVM CPU kernel settles a row (a model of its plan), so a test can show that it
    covers each."""
    n = window.numel()
    if n <= k:
        return "whole window"
    top = tie_keys(window).astype(np.int64) >> (32 - bits)
    counts = np.bincount(top, minlength=1 << bits)
    at_or_above = np.cumsum(counts[::-1])[::-1]
    d = int(np.nonzero(at_or_above >= k)[0].max())
    rest = k - int(counts[d + 1:].sum())
    if counts[d] == rest:
        return "whole bin"
    if counts[d] > candidates:
        return "passes over the row"
    return "sparse candidates" if counts[d] * 8 <= n else "dense candidates"


CPU_TOPK_PATHS = {"whole window", "whole bin", "sparse candidates", "dense candidates", "passes over the row"}
NAN_BITS = torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF], dtype=torch.int64).to(torch.int32)


def topk_rows(gen, kinds, next_n, width):
    """values(shape) for topk_case: the rows of request b (next_n each) filled as kinds[b] says."""
    def fill(kind, n):
        if kind == "normal":
            return torch.randn(n, generator=gen)
        if kind == "four-values":  # ties: the k-th largest value's bin is mostly ties
            return torch.randint(0, 4, (n,), generator=gen).float()
        if kind == "all-equal":
            return torch.full((n,), 0.5)
        if kind == "whole-bin":  # 10 keys of 100 and 27 of 50 above small values: k = 37 takes both bins whole
            x = torch.rand(n, generator=gen)
            spots = torch.randperm(400, generator=gen)
            x[spots[:10]] = 100.0
            x[spots[10:37]] = 50.0
            return x
        if kind == "nan-inf":  # 20 NaN of four payloads, 30 +inf (17 needed: the lowest), -inf, +-0
            x = torch.where(torch.rand(n, generator=gen) < 0.5, -0.0, 0.0)
            x[torch.rand(n, generator=gen) < 0.3] = -math.inf
            spots = torch.randperm(400, generator=gen)
            x[spots[:20]] = NAN_BITS[torch.randint(0, 4, (20,), generator=gen)].view(torch.float32)
            x[spots[20:50]] = math.inf
            return x
        if kind == "zeros":  # -0 and +0 tie; the few negatives never win
            x = torch.where(torch.rand(n, generator=gen) < 0.5, -0.0, 0.0)
            x[torch.rand(n, generator=gen) < 0.05] = -1e-45
            return x
        raise AssertionError(kind)

    return lambda shape: torch.stack([fill(kinds[r // next_n], width) for r in range(shape[0])])


TOPK_SCHEDULES = [
    (1, {"cpu_radix_bits": 8, "cpu_candidates": 1024, "cpu_rows_per_task": 4}),
    (2, {"cpu_radix_bits": 10, "cpu_candidates": 1024, "cpu_rows_per_task": 1}),
    (3, {"cpu_radix_bits": 12, "cpu_candidates": 2048, "cpu_rows_per_task": 2, "sorted": 1}),
    (4, {"cpu_radix_bits": 11, "cpu_candidates": 1024, "cpu_rows_per_task": 8}),
]


@pytest.mark.parametrize("next_n,schedule", TOPK_SCHEDULES,
                         ids=[f"N{n}-r{s['cpu_radix_bits']}" for n, s in TOPK_SCHEDULES])
def test_decode_topk_takes_every_cpu_path(gen, next_n, schedule):
    """k = 37 on 16-token pages, next_n 1..4, radix digits of 8/10/12/11 bits: requests whose rows are
    settled whole (windows shorter than k, empty, int32 extremes), by a wholly needed bin, by sparse and
    dense candidate bins (ties among them, NaN payloads, +-inf, +-0) and by passes over the row (a
    bin of ties too big for the candidates); the slots are the canonical bytes, into a poisoned output."""
    kinds = ["normal", "four-values", "all-equal", "whole-bin", "nan-inf", "zeros", "normal", "normal", "normal"]
    lens = [3000, 1500, 2600, 800, 1200, 900, 30, next_n - 1, -(2**31)]
    kernels = dsagen.build(topk_spec(37, 16), backend="tvm", schedules={"decode_topk": schedule})
    case = topk_case(gen, lens, next_n, 16, values=topk_rows(gen, kinds, next_n, 3008))
    out = torch.full((len(lens), next_n, 37), -7, dtype=torch.int32)
    got = kernels.decode_topk(*case, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, dt.decode_topk_reference(*case, 37, 16))
    logits, lens_t = case[0], case[1]
    visible = dt.visible_lengths(lens_t, next_n, logits.shape[1])
    bits, cand = schedule["cpu_radix_bits"], schedule["cpu_candidates"]
    taken = {cpu_topk_path(logits[r, :int(visible[r])], 37, bits, cand) for r in range(logits.shape[0])}
    assert taken == CPU_TOPK_PATHS
    assert (out[-1] == -1).all()  # a context of -2**31: empty windows
    for j in range(next_n):  # a context of next_n - 1 tokens: query j sees j of them
        assert (out[-2, j, j:] == -1).all() and (out[-2, j, :j] >= 0).all()


def test_decode_topk_on_long_rows(gen):
    """k = 2048 over rows of up to 40K keys (the serving spec's top-k): N(0, 1) rows, a row of 24K
    equal keys (passes over the row) and one whose 30K keys hold 30 values."""
    spec = topk_spec(2048, 64)
    kernels = dsagen.build(spec, backend="tvm")

    def values(shape):
        x = torch.randn(shape, generator=gen)
        x[2:4] = 0.25
        x[4:] = torch.randint(0, 30, (2, shape[1]), generator=gen).float()
        return x

    case = topk_case(gen, [40000, 24001, 30000], 2, 64, values=values)
    assert torch.equal(kernels.decode_topk(*case), dt.decode_topk_reference(*case, 2048, 64))


def test_decode_topk_sorted_slots_equal_tritons(device, gen):
    """Both backends on the test device, one set of inputs (ties, NaN, +-inf, -0, windows shorter
    than k and empty, positions past the table): TVM's slots, under every `sorted` value and a
    small schedule, are bitwise the Triton kernel's sorted ones; a deterministic TVM build pins
    sorted = 1 too."""
    if device.type == "cpu" and (problem_ := interpreter_problem()):
        pytest.skip(problem_)
    spec = topk_spec(64, 16)

    def values(shape):
        x = torch.randint(-6, 6, shape, generator=gen).float() / 2
        x[torch.rand(shape, generator=gen) < 0.01] = math.nan
        x[torch.rand(shape, generator=gen) < 0.01] = math.inf
        x[x == 0] = -0.0
        return x

    case = topk_case(gen, [1500, 777, 40, 1, 600], 3, 16, max_blocks=30, values=values)
    args = tuple(t.to(device) for t in case)
    want = dsagen.build(spec, schedules={"decode_topk": {"sorted": 1}}).decode_topk(*args)
    assert torch.equal(want.cpu(), dt.decode_topk_reference(*case, 64, 16))
    for schedule in ({"sorted": 0}, {"sorted": 1}, TVM_SMALL):
        got = dsagen.build(spec, backend="tvm", schedules={"decode_topk": schedule}).decode_topk(*args)
        assert torch.equal(got, want), schedule
    assert dsagen.build(spec, backend="tvm", deterministic=True).resolve("decode_topk").point["sorted"] == 1
