"""The cache writer on DeepSeek-V4's MODEL1 page blocks (cache.mla_format = deepseek_v4_fp8): per
block, page x 576 B data rows [448 fp8 | 64 bf16], then page x 8 B scale rows [7 ue8m0 | 1 pad],
the block padded to a multiple of 576 B. Bit-exact against the host codec (quantize_mla_pages),
every other byte of the storage, the blocks' padding included, untouched; invalid slots skipped;
odd page sizes; on both backends."""
from __future__ import annotations

import dataclasses
import platform

import pytest
import torch

import dsagen
import dsagen.ops.mla_cache_write_workload as mcw
from dsagen.cache_formats import MLA_FORMATS, allocate_mla_cache, quantize_mla_pages
from dsagen.ops import get_op
from dsagen.verify import Mismatch
from dsagen.workloads import workload

from test_mla_cache_write import plant_non_finite, random_slots

V4 = MLA_FORMATS["deepseek_v4_fp8"]
WIDTH = V4.latent_dim + V4.rope_dim  # 512: 448 NoPE | 64 RoPE
SCHEDULES = {"triton": [None, {"block_r": 1, "num_warps": 1}, {"block_r": 16, "num_warps": 8}],
             "tvm": [None, {"cpu_rows_per_task": 1, "cuda_threads": 64, "cuda_rows_per_block": 1},
                     {"cpu_rows_per_task": 32, "cuda_threads": 256, "cuda_rows_per_block": 8}]}


def v4_spec(page_size: int) -> dsagen.Spec:
    """A spec with V4's attention dims (q and V the whole 512-value row) naming the MODEL1 cache."""
    return dsagen.Spec(attention=dsagen.AttentionSpec(heads=64, qk_dim=WIDTH, v_dim=WIDTH),
                       cache=dsagen.CacheSpec(page_size=page_size, mla_format="deepseek_v4_fp8"))


def v4_rows(gen, n: int) -> torch.Tensor:
    """Rows of mixed magnitudes (2^-40 .. 2^40 per row) with edge groups: all zero, below the
    scale floor (amax / 448 < 1e-4, bf16 subnormals too), amax exactly 448 * 2^k and the next bf16
    above it, the largest bf16 values, -0."""
    mag = torch.exp2(torch.randint(-40, 40, (n, 1), generator=gen).float())
    rows = (torch.randn(n, WIDTH, generator=gen) * mag).bfloat16()
    g = V4.group
    edge = [
        torch.zeros(g),
        torch.randn(g, generator=gen) * 1e-3,
        torch.full((g,), 2.0**-130) * torch.randn(g, generator=gen).sign(),
        torch.cat([torch.tensor([448.0 * 2**-3]), torch.randn(g - 1, generator=gen)]),
        torch.cat([torch.tensor([-450.0]), torch.randn(g - 1, generator=gen) * 100]),
        torch.full((g,), 3.3895e38) * torch.randn(g, generator=gen).sign(),
        torch.full((g,), -0.0),
    ]
    for i in range(min(n, len(edge))):
        rows[i, (i % V4.n_scales) * g:(i % V4.n_scales + 1) * g] = edge[i].bfloat16()
    return rows


def assert_storage_written(kernels, spec, rows, slots, cache):
    """Run the writer and compare every byte of the cache's storage with the host codec's."""
    want = mcw.storage_bytes(mcw.expected_cache(spec, rows.cpu(), slots.cpu(), cache.cpu()))
    assert kernels.mla_cache_write(rows, slots, cache) is None
    bad = mcw.storage_bytes(cache).cpu() != want
    assert not bad.any(), f"{int(bad.sum())} bytes differ, at {bad.nonzero()[:6].flatten().tolist()}"
    return want


WRITE_CASES = [  # page size, pages, rows, schedule (SCHEDULES[backend][which])
    (64, 2, 21, 0), (1, 20, 12, 1), (3, 9, 16, 2), (53, 2, 24, 0), (61, 2, 9, 1)]


@pytest.mark.parametrize("page,n_pages,n,which", WRITE_CASES, ids=[f"p{c[0]}-n{c[2]}-s{c[3]}" for c in WRITE_CASES])
def test_v4_writes_exactly_the_codec_bytes_and_nothing_else(device, backend, gen, page, n_pages, n, which):
    spec = v4_spec(page)
    schedule = SCHEDULES[backend][which]
    kernels = dsagen.build(spec, backend=backend, schedules={"mla_cache_write": schedule} if schedule else None)
    dtype = torch.int64 if n % 2 else torch.int32
    slots = random_slots(gen, n, n_pages * page, dtype)
    want = assert_storage_written(kernels, spec, v4_rows(gen, n).to(device), slots.to(device),
                                  mcw.poisoned_cache(spec, n_pages, device))
    assert not torch.equal(want, mcw.storage_bytes(mcw.poisoned_cache(spec, n_pages, "cpu")))


@pytest.mark.parametrize("page,n_blocks", [(3, 3), (13, 2)])
def test_every_slot_written_equals_quantize_mla_pages(device, backend, gen, page, n_blocks):
    """Rows written to every slot, in a shuffled order, into a zeroed cache: the storage holds
    quantize_mla_pages of the rows in slot order, byte for byte."""
    spec = v4_spec(page)
    kernels = dsagen.build(spec, backend=backend, schedules={"mla_cache_write": SCHEDULES[backend][2]})
    rows = v4_rows(gen, n_blocks * page)
    order = torch.randperm(n_blocks * page, generator=gen)
    cache = allocate_mla_cache(V4, n_blocks, page, device)
    kernels.mla_cache_write(rows[order].to(device), order.int().to(device), cache)
    want = quantize_mla_pages(rows, V4, page)
    assert cache.stride(0) == want.stride(0) and cache.stride(0) % 576 == 0
    assert torch.equal(mcw.storage_bytes(cache).cpu(), mcw.storage_bytes(want))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="the host codec's NaN signs are those of x86 floating point")
def test_v4_non_finite_groups_follow_the_host_codec(device, backend, gen):
    """A NaN or +-inf in a group: the ue8m0 NaN byte, NaN codes (a NaN value keeps its sign)."""
    spec = v4_spec(4)
    kernels = dsagen.build(spec, backend=backend)
    rows = plant_non_finite(v4_rows(gen, 4))
    slots = torch.tensor([3, 0, 6, 1], dtype=torch.int64)
    want = assert_storage_written(kernels, spec, rows.to(device), slots.to(device), mcw.poisoned_cache(spec, 2, device))
    assert (want == 0xFF).any()


def test_v4_skips_invalid_rows_and_writes_into_strided_blocks(device, backend, gen):
    """Blocks further apart than their padded size (a view into a larger buffer): the gaps keep
    their bytes; negative and out-of-range slots write nothing."""
    page, n_blocks = 5, 3
    spec = v4_spec(page)
    kernels = dsagen.build(spec, backend=backend)
    block = 2 * 576 * 7  # > the padded 5 x 584 = 2920 -> 3456 bytes
    buf = torch.randint(0, 256, (n_blocks * block + 100,), generator=gen, dtype=torch.uint8).to(device)
    cache = buf.as_strided((n_blocks, page, 1, V4.bytes_per_token), (block, V4.bytes_per_token, 1, 1), 50)
    rows = v4_rows(gen, 6).to(device)
    slots = torch.tensor([-1, 7, n_blocks * page, 14, -(2**31), 0], dtype=torch.int32, device=device)
    assert_storage_written(kernels, spec, rows, slots, cache)


def test_v4_workload_and_bad_caches(device, backend):
    spec = v4_spec(3)
    op = get_op("mla_cache_write")
    kernels = dsagen.build(spec, backend=backend)
    assert "mla_cache_write_blocks_l448_r64_g64_p3_" in kernels.path(
        kernels.resolve("mla_cache_write", device_type=device.type)).name
    inputs = workload(op).inputs(spec, 3, 7, device, seed=1)
    rows, slots, cache = inputs
    assert rows.shape == (6, WIDTH) and cache.shape == (9, 3, 1, 584) and cache.stride(0) == 2304
    with pytest.raises(Mismatch, match="cache bytes differ"):
        workload(op).check(spec, (rows, torch.arange(6, dtype=torch.int32, device=device), cache), None, None)
    assert "bitwise" in workload(op).check(spec, inputs, kernels.launch("mla_cache_write", inputs), None)
    inputs = workload(op).inputs(spec, 3, 7, device, seed=2)
    workload(op).naive(spec, inputs)()
    workload(op).check(spec, inputs, None, None)
    unpacked = torch.zeros(2, 3, 1, 600, dtype=torch.uint8, device=device)[..., :584]
    with pytest.raises(ValueError, match="cache must hold each block's 3 x 584 bytes packed"):
        kernels.mla_cache_write(rows, slots, unpacked)
    with pytest.raises(ValueError, match=r"cache must have shape \[\*, 3, 1, 584\]"):
        kernels.mla_cache_write(rows, slots, torch.zeros(2, 3, 1, 656, dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match=r"rows must have shape \[\*, 512\]"):
        kernels.mla_cache_write(torch.zeros(6, 576, dtype=torch.bfloat16, device=device), slots, cache)


def test_the_v32_rendering_is_unchanged_by_the_block_branch():
    """The row-format spec keeps its module name; the block spec gets its own."""
    op = get_op("mla_cache_write")
    v32 = dsagen.Spec(cache=dsagen.CacheSpec(page_size=64))
    assert op.module_stem(v32) == "mla_cache_write_l512_r64_g128_p64"
    assert op.module_stem(v4_spec(64)) == "mla_cache_write_blocks_l448_r64_g64_p64"
    assert dataclasses.replace(v32.cache, page_size=53).page_size == 53
