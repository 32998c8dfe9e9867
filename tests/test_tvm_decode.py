"""The TVM decode kernels (mla_cache_write, paged_indexer, sparse_decode) beyond the shared decode
tests, which run on both backends: the sm_90 CUDA source of each (compiled with nvcc when present),
CPU schedules far apart, the TVM split-k path, odd head counts and next_n, partial last pages,
invalid slots of every kind into poisoned outputs, Triton/TVM parity and a whole decode step."""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import dsagen
import dsagen.ops.mla_cache_write as mcw
import dsagen.ops.paged_indexer as paged
from dsagen import reference
from dsagen.backends import tvm as tvm_backend
from dsagen.backends.triton import interpreter_problem
from dsagen.cache_formats import MLA_FORMATS, dequantize_mla_rows
from dsagen.decode import decode_windows, positions_to_slots
from dsagen.gpus import get_gpu
from dsagen.plan import problem_symbols
from dsagen.schedule import load_space
from dsagen.tuning.study import fixed_knobs
from dsagen.verify import TOLERANCES, assert_close, assert_topk
from test_decode_step import Batch, serving_spec
from test_paged_indexer import make_case, make_spec as indexer_spec
from test_sparse_decode import expected, make_spec as decode_spec, problem

pytestmark = pytest.mark.skipif(tvm_backend.available() is not None, reason=str(tvm_backend.available()))

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("mla_cache_write", "paged_indexer", "sparse_decode")
FMT = MLA_FORMATS["deepseek_v32_fp8"]
WIDTH = FMT.latent_dim + FMT.rope_dim


def serving() -> dsagen.Spec:
    return dsagen.load_spec(ROOT / "specs" / "deepseek_v32_serving.toml")


def nvcc_compiles(source: str, tmp_path: Path, name: str) -> None:
    """nvcc compiles TVM's CUDA source to an sm_90 object (when nvcc is installed)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    cu = tmp_path / f"{name}.cu"
    cu.write_text(source)
    proc = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", str(cu), "-o", str(tmp_path / f"{name}.o")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


CUDA_CASES = [
    ("mla_cache_write", None),
    ("paged_indexer", None),
    ("sparse_decode", None),
    ("sparse_decode", {"cuda_k_split": 4, "cuda_block_h": 8, "cuda_block_n": 4, "cuda_threads": 256}),
]


@pytest.mark.parametrize("kernel,schedule", CUDA_CASES, ids=["mla_cache_write", "paged_indexer", "sparse_decode",
                                                             "sparse_decode-split4"])
def test_cuda_source_for_sm90(kernel, schedule, tmp_path):
    """TVM generates each decode kernel's CUDA source without a GPU (the V3.2 serving spec); nvcc
    compiles it for sm_90 when it is installed."""
    kernels = dsagen.build(serving(), backend="tvm", schedules={kernel: schedule} if schedule else None)
    source = tvm_backend.cuda_source(kernels.resolve(kernel, device_type="cpu").path)
    assert '__global__' in source and 'extern "C"' in source
    if kernel == "mla_cache_write":  # int32 and int64 slot mappings, and the encoder probe
        assert all(f" {name}_kernel(" in source for name in ("main", "main_i64", "probe"))
    if schedule:
        assert " combine_kernel(" in source
    nvcc_compiles(source, tmp_path, kernel)


def test_cuda_source_for_odd_shapes(tmp_path):
    """3 query heads, 5 indexer heads of 40 dims, k = 37, 16-token pages: every kernel still builds
    for sm_90 (heads past the last, partial tiles and the split-k combine)."""
    spec = dsagen.Spec(indexer=dsagen.IndexerSpec(heads=5, head_dim=40), topk=dsagen.TopKSpec(k=37),
                       attention=dsagen.AttentionSpec(heads=3), cache=dsagen.CacheSpec(page_size=16))
    schedules = {"sparse_decode": {"cuda_k_split": 2, "cuda_block_n": 16, "cuda_block_h": 2}}
    kernels = dsagen.build(spec, backend="tvm", schedules=schedules)
    for kernel in KERNELS:
        source = tvm_backend.cuda_source(kernels.resolve(kernel, device_type="cpu").path)
        assert '__global__' in source
        nvcc_compiles(source, tmp_path, kernel)


def cpu_points(spec: dsagen.Spec, kernel: str) -> list[dict]:
    """Three legal CPU schedules far apart (first, middle, last of the legal grid; CUDA knobs fixed)."""
    space = load_space("tvm", kernel)
    fixed = fixed_knobs(space, "cpu", dsagen.build(spec, backend="tvm").resolve(kernel, device_type="cpu").point)
    legal = [p for p in space.legal_points(problem_symbols(spec, kernel, get_gpu("nvidia-h200")))
             if all(p[k] == v for k, v in fixed.items())]
    return [legal[0], legal[len(legal) // 2], legal[-1]]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["first", "middle", "last"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_cpu_schedules_far_apart_agree_with_the_reference(kernel, which, gen):
    spec = dsagen.Spec(indexer=dsagen.IndexerSpec(heads=16, head_dim=128), topk=dsagen.TopKSpec(k=150),
                       attention=dsagen.AttentionSpec(heads=20), cache=dsagen.CacheSpec(page_size=16))
    point = cpu_points(spec, kernel)[which]
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
    """write -> paged indexer -> top-k -> slots -> sparse decode, all TVM kernels on the CPU."""
    spec = serving_spec()
    kernels = dsagen.build(spec, backend="tvm")
    batch = Batch(spec, gen, context_lens, next_n, max_blocks=3, device="cpu")
    mla_cache = batch.mla_cache.clone()
    kernels.mla_cache_write(batch.rows, torch.arange(batch.rows.shape[0], dtype=torch.int32), mla_cache)
    res = kernels.decode(batch.q, mla_cache, batch.index_q, batch.index_cache, batch.weights, batch.context_lens,
                         batch.block_table)
    logits64 = batch.reference_logits()
    ks, ke = decode_windows(batch.context_lens, next_n)
    positions = kernels.topk(kernels.paged_indexer(batch.index_q, batch.index_cache, batch.weights,
                                                   batch.context_lens, batch.block_table), ks, ke)
    assert_topk(positions, logits64, ks, ke, spec.topk.k, tolerance=TOLERANCES["indexer.logits.fp8_e4m3"])
    slots = positions_to_slots(positions, batch.block_table, spec.cache.page_size, next_n)
    assert torch.equal(res.slots.sort(-1).values, slots.sort(-1).values)  # the same slots, in any order
    rows = dequantize_mla_rows(mla_cache.reshape(-1, FMT.bytes_per_token), FMT)
    B, H = len(context_lens), spec.attention.heads
    ref_out, ref_lse = reference.sparse_attention(batch.q.reshape(B * next_n, H, WIDTH), rows,
                                                  res.slots.reshape(B * next_n, -1), spec.attention.softmax_scale,
                                                  FMT.latent_dim)
    assert_close("sparse_decode.out", res.out.reshape(B * next_n, H, -1), ref_out)
    assert_close("sparse_decode.lse", res.lse.reshape(B * next_n, H), ref_lse)
