"""The MLA cache writer: bitwise equal to the host codec (quantize_mla_rows) in every written slot,
every other byte untouched (poisoned caches), invalid and out-of-range slots skipped, strided
views, and the in-kernel e4m3 encoder and scale rule against torch on every value of interest; on
both backends."""
from __future__ import annotations

import platform

import pytest
import torch

from dsagen.workloads import workload
import dsagen
import dsagen.ops.mla_cache_write_workload as mcw
from dsagen.backends import launcher as backend_launcher
from dsagen.cache_formats import MLA_FORMATS, dequantize_mla_rows, pow2_scale
from dsagen.ops import get_op
from dsagen.verify import Mismatch

FMT = MLA_FORMATS["deepseek_v32_fp8"]
BPT = FMT.bytes_per_token
WIDTH = FMT.latent_dim + FMT.rope_dim


def cache_spec(page_size: int = 64) -> dsagen.Spec:
    return dsagen.Spec(cache=dsagen.CacheSpec(page_size=page_size))


def probe(kernels, device):
    hit = kernels.resolve("mla_cache_write", device_type=device.type)
    return backend_launcher(kernels.backend, kernels.path(hit), "probe_quantizer", device.type)


def f32_bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous().view(torch.int32)


def values_of_interest(gen) -> torch.Tensor:
    """fp32 bit patterns: every exponent x every top-8 mantissa bits x low bits {0, 1, all ones}
    x both signs (all rounding positions of normal and subnormal e4m3, ties, sticky bits), every
    e4m3 value and midpoint and their fp32 neighbours, every bf16 pattern, random patterns."""
    e = torch.arange(256, dtype=torch.int64)[:, None, None]
    top = torch.arange(256, dtype=torch.int64)[None, :, None] << 15
    low = torch.tensor([0, 1, 0x7FFF], dtype=torch.int64)[None, None, :]
    grid = ((e << 23) | top | low).reshape(-1)
    e4m3 = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[torch.isfinite(e4m3) & (e4m3 >= 0)].sort().values
    mids = (e4m3[1:].double() + e4m3[:-1].double()) / 2
    pts = f32_bits(torch.cat([e4m3, mids.float(), torch.tensor([448.0, 464.0, 480.0, 2.0**-10, 2.0**-7 * 1.5])]))
    near = torch.cat([pts - 1, pts, pts + 1]).long()
    bf16 = torch.arange(1 << 16, dtype=torch.int64) << 16
    rand = torch.randint(0, 1 << 31, (100_000,), generator=gen, dtype=torch.int64)
    pos = torch.cat([grid, near.clamp_min(0), bf16 & 0x7FFFFFFF, rand])
    both = torch.cat([pos, pos | (1 << 31)])
    return torch.where(both >= 1 << 31, both - (1 << 32), both).to(torch.int32)


def test_the_in_kernel_encoder_and_scale_rule_match_torch(device, backend, gen):
    kernels = dsagen.build(cache_spec(), backend=backend)
    bits = values_of_interest(gen)
    codes, scales = probe(kernels, device)(bits.to(device))
    x = bits.view(torch.float32)
    want = x.double().clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).int()
    bad = codes.cpu() != want
    assert not bad.any(), (f"{int(bad.sum())} codes differ, e.g. x={x[bad][:4].tolist()} "
                           f"got {codes.cpu()[bad][:4].tolist()} want {want[bad][:4].tolist()}")
    finite = torch.isfinite(x)
    want_scale = f32_bits(pow2_scale(x[finite].abs()))
    got_scale = scales.cpu()[finite]
    bad = got_scale != want_scale
    assert not bad.any(), f"{int(bad.sum())} scales differ, e.g. amax={x[finite][bad][:4].tolist()}"


def special_rows(gen, n: int) -> torch.Tensor:
    """Random rows whose groups span the magnitudes (2^-40 .. 2^40 per row) plus groups that hit
    the edges: all zero, all below the 1e-4 floor (bf16 subnormals too), amax exactly 448 * 2^k
    and the next bf16 above, the e4m3 ties at scale 1, the largest bf16 values, -0."""
    mag = torch.exp2(torch.randint(-40, 40, (n, 1), generator=gen).float())
    rows = (torch.randn(n, WIDTH, generator=gen) * mag).bfloat16()
    g = FMT.group
    edge = [
        torch.zeros(g),
        torch.randn(g, generator=gen) * 1e-5,
        torch.full((g,), 2.0**-130) * torch.randn(g, generator=gen).sign(),
        torch.cat([torch.tensor([448.0 * 2**-3]), torch.randn(g - 1, generator=gen)]),
        torch.cat([torch.tensor([-450.0]), torch.randn(g - 1, generator=gen) * 100]),
        torch.cat([torch.tensor([448.0]), torch.tensor([1.0625, 1.1875, 0.0029296875, 0.0009765625, -240.0 - 8,
                                                        2.0**-10, 3 * 2.0**-10, 15 * 2.0**-10]),
                   torch.zeros(g - 9)]),
        torch.full((g,), 3.3895e38) * torch.randn(g, generator=gen).sign(),
        torch.full((g,), -0.0),
    ]
    for i in range(min(n, len(edge))):
        rows[i, (i % FMT.n_scales) * g:(i % FMT.n_scales + 1) * g] = edge[i].bfloat16()
    return rows


def random_slots(gen, n: int, n_slots: int, dtype, invalid: bool = True) -> torch.Tensor:
    """n distinct slots in [0, n_slots) in random order, with the invalid ones put in when asked:
    -1, -2^31, n_slots, 2^31 - 1 (and +-2^40 for int64)."""
    slots = torch.randperm(max(n_slots, n), generator=gen)[:n].long()
    slots[slots >= n_slots] = -1
    if invalid:
        bad = [-1, -(2**31), n_slots, 2**31 - 1] + ([2**40, -(2**40)] if dtype == torch.int64 else [])
        where = torch.randperm(n, generator=gen)[:len(bad)]
        for i, b in zip(where.tolist(), bad):
            slots[i] = b
    return slots.to(dtype)


def assert_written(kernels, spec, rows, slots, cache):
    """Run the writer on a poisoned copy and compare every byte with the host codec's."""
    before = cache.clone()
    want = mcw.expected_cache(spec, rows.cpu(), slots.cpu(), before.cpu())
    result = kernels.mla_cache_write(rows, slots, cache)
    assert result is None
    bad = cache.cpu() != want
    where = bad.reshape(-1, BPT).any(-1).nonzero()[:6].flatten().tolist()
    assert not bad.any(), f"{int(bad.sum())} bytes differ in slots {where}"
    return want


WRITE_CASES = [
    # n rows, page_size, n_pages, slot dtype
    (1, 64, 1, torch.int32),
    (6, 1, 11, torch.int64),   # next_n 3 x 2 requests, one token per page
    (16, 16, 3, torch.int32),  # next_n 4 x 4 requests, a partial last page used
    (37, 64, 2, torch.int64),
    (40, 4, 13, torch.int32),
]
# per backend: the default, the smallest and the largest work per program / task / block
SCHEDULES = {
    "triton": [None, {"block_r": 1, "num_warps": 1}, {"block_r": 16, "num_warps": 8}],
    "tvm": [None, {"cpu_rows_per_task": 1, "cuda_threads": 64, "cuda_rows_per_block": 1},
            {"cpu_rows_per_task": 32, "cuda_threads": 512, "cuda_rows_per_block": 8}],
}


@pytest.mark.parametrize("n,page,n_pages,dtype", WRITE_CASES,
                         ids=[f"n{c[0]}-page{c[1]}-pages{c[2]}-{str(c[3])[6:]}" for c in WRITE_CASES])
@pytest.mark.parametrize("which", [0, 1, 2], ids=["default", "small", "large"])
def test_writes_exactly_the_codec_bytes_and_nothing_else(device, backend, gen, n, page, n_pages, dtype, which):
    spec = cache_spec(page)
    schedule = SCHEDULES[backend][which]
    kernels = dsagen.build(spec, backend=backend, schedules={"mla_cache_write": schedule} if schedule else None)
    rows = special_rows(gen, n)
    slots = random_slots(gen, n, n_pages * page, dtype, invalid=n >= 8)
    cache = mcw.poison_pattern(n_pages, page, BPT, "cpu")
    want = assert_written(kernels, spec, rows.to(device), slots.to(device), cache.to(device))
    # the round trip: within the e4m3 rounding of each value (2^-4 relative, 2^-10 scale near zero)
    keep = mcw.valid_slots(slots, n_pages * page)
    s = slots.long()[keep]
    got = dequantize_mla_rows(want[s // page, s % page, 0], FMT)
    x = rows[keep].double()
    finite = torch.isfinite(got[:, :FMT.latent_dim]).all(-1)
    lat, ref = got[finite, :FMT.latent_dim], x[finite, :FMT.latent_dim]
    scale = want[s // page, s % page, 0][finite, FMT.scale_offset:FMT.rope_offset].contiguous().view(torch.float32)
    bound = torch.maximum(ref.abs() * 2**-4, scale.double().repeat_interleave(FMT.group, 1) * 2**-10)
    assert ((lat - ref).abs() <= bound).all()
    assert torch.equal(got[:, FMT.latent_dim:], x[:, FMT.latent_dim:])


def test_strided_views_and_their_gaps(device, backend, gen):
    """rows with a padded row stride, a strided slot mapping, a cache view whose tokens and pages
    sit apart in a larger buffer: the gaps keep their bytes."""
    page, n_pages, n = 8, 5, 21
    spec = cache_spec(page)
    kernels = dsagen.build(spec, backend=backend)
    rows = torch.zeros(n, WIDTH + 24, dtype=torch.bfloat16)
    rows[:, :WIDTH] = special_rows(gen, n)
    slots = torch.full((2 * n,), -5, dtype=torch.int32)
    slots[::2] = random_slots(gen, n, n_pages * page, torch.int32)
    buf = torch.randint(0, 256, (n_pages, page + 3, 1, BPT + 40), generator=gen, dtype=torch.uint8)
    buf_dev = buf.to(device)
    cache = buf_dev[:, 1:page + 1, :, 7:7 + BPT]
    assert cache.stride() == ((page + 3) * (BPT + 40), BPT + 40, BPT + 40, 1)
    assert_written(kernels, spec, rows.to(device)[:, :WIDTH], slots.to(device)[::2], cache)
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[:, 1:page + 1, :, 7:7 + BPT] = False
    assert torch.equal(buf_dev.cpu()[outside], buf[outside])


def test_no_rows_all_invalid_rows_and_an_empty_cache(device, backend, gen):
    spec = cache_spec(16)
    kernels = dsagen.build(spec, backend=backend)
    cache = mcw.poison_pattern(3, 16, BPT, device)
    before = cache.clone()
    kernels.mla_cache_write(torch.empty(0, WIDTH, dtype=torch.bfloat16, device=device),
                            torch.empty(0, dtype=torch.int32, device=device), cache)
    rows = special_rows(gen, 5).to(device)
    slots = torch.tensor([-1, 48, -(2**31), 2**31 - 1, 49], dtype=torch.int32, device=device)
    kernels.mla_cache_write(rows, slots, cache)
    assert torch.equal(cache, before)
    kernels.mla_cache_write(rows, slots, torch.empty(0, 16, 1, BPT, dtype=torch.uint8, device=device))


def plant_non_finite(rows: torch.Tensor) -> torch.Tensor:
    """rows (4 or more, 401 or more columns) with NaN of both signs, +-inf, and a group holding
    both -inf and NaN, in place; returned for chaining."""
    nan, inf = float("nan"), float("inf")
    bits = rows.view(torch.int16)  # a bf16 -NaN needs its bits: float -> bf16 makes every NaN 0x7FC0
    rows[0, 3], bits[0, 200] = nan, 0xFFC0 - (1 << 16)
    rows[1, 130], rows[1, 5] = inf, -inf
    rows[2, 260], rows[2, 261] = -inf, nan
    bits[3, 400] = 0xFFC0 - (1 << 16)
    return rows


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="the host codec's NaN signs are those of x86 floating point")
def test_non_finite_groups_follow_the_host_codec(device, backend, gen):
    """A NaN in a group: scale NaN, codes NaN; +-inf in a group: scale inf, finite values +-0."""
    spec = cache_spec(4)
    kernels = dsagen.build(spec, backend=backend)
    rows = plant_non_finite(special_rows(gen, 4))
    slots = torch.tensor([3, 0, 6, 1], dtype=torch.int64)
    assert_written(kernels, spec, rows.to(device), slots.to(device), mcw.poison_pattern(2, 4, BPT, device))


def test_the_workload_checks_and_its_naive_baseline(device, backend):
    spec = cache_spec(16)
    op = get_op("mla_cache_write")
    kernels = dsagen.build(spec, backend=backend)
    inputs = workload(op).inputs(spec, 3, 70, device, seed=1)
    rows, slots, cache = inputs
    assert rows.shape == (6, WIDTH) and slots.dtype == torch.int32 and cache.shape == (15, 16, 1, BPT)
    assert workload(op).poisoned_outputs(spec, inputs) == {}
    call = op.check_args(spec, *inputs)
    assert (call.S, call.SKV) == (6, 80)  # 15 pages of 16 tokens for 3 requests
    with pytest.raises(Mismatch, match="cache bytes differ"):
        slots[:] = torch.arange(6, dtype=torch.int32)  # nothing written yet: those slots hold the poison
        workload(op).check(spec, inputs, None, torch.arange(3))
    inputs = workload(op).inputs(spec, 3, 70, device, seed=1)
    assert "bitwise" in workload(op).check(spec, inputs, kernels.launch("mla_cache_write", inputs), torch.arange(3))
    inputs = workload(op).inputs(spec, 3, 70, device, seed=2)
    workload(op).naive(spec, inputs)()
    workload(op).check(spec, inputs, None, torch.arange(3))  # the fp32 torch baseline is exact too
    short = workload(op).inputs(spec, 2, 1, device, seed=3)  # a context of 1 token: the second row is padding
    assert short[1].view(2, 2)[:, 0].eq(-1).all()


def test_bad_arguments_name_the_argument(device, backend):
    spec = cache_spec(16)
    kernels = dsagen.build(spec, backend=backend)
    rows = torch.zeros(4, WIDTH, dtype=torch.bfloat16, device=device)
    slots = torch.zeros(4, dtype=torch.int32, device=device)
    cache = torch.zeros(2, 16, 1, BPT, dtype=torch.uint8, device=device)
    bad = [
        ((rows.float(), slots, cache), "rows must have dtype torch.bfloat16"),
        ((rows[:, :512], slots, cache), r"rows must have shape \[\*, 576\]"),
        ((rows.t().contiguous().t(), slots, cache), "rows must be contiguous in its last dimension"),
        ((rows, slots.float(), cache), "slot_mapping must be an int32 or int64 tensor"),
        ((rows, slots[:3], cache), r"slot_mapping must have shape \[4\]"),
        ((rows, slots, cache.view(torch.int8)), "cache must have dtype torch.uint8"),
        ((rows, slots, torch.zeros(2, 64, 1, BPT, dtype=torch.uint8, device=device)),
         r"cache must have shape \[\*, 16, 1, 656\]"),
        ((rows, slots, cache[:1].expand(2, 16, 1, BPT)), "each token's 656 bytes apart"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            kernels.mla_cache_write(*args)


def test_op_metadata_and_torch_op(device, backend, gen):
    op = get_op("mla_cache_write")
    assert not op.enabled(dsagen.Spec(), backend) and op.enabled(cache_spec(), backend)
    assert "mla_cache_write" not in dsagen.build(dsagen.Spec(), backend=backend).kernels()
    assert op.cost(cache_spec()).compute_unit == "none"
    spec = cache_spec(2)
    kernels = dsagen.build(spec, backend=backend)
    schema = str(torch.ops.dsagen.mla_cache_write.default._schema)
    assert "Tensor(a!) cache" in schema and schema.endswith("-> ()")
    rows = special_rows(gen, 3).to(device)
    slots = torch.tensor([5, -1, 0], dtype=torch.int32, device=device)
    cache = mcw.poison_pattern(4, 2, BPT, device)
    want = mcw.expected_cache(spec, rows.cpu(), slots.cpu(), cache.cpu())
    assert op.fake(spec, rows, slots, cache) is None

    def step(r, s, c):
        kernels.mla_cache_write(r, s, c)
        return c.sum(dtype=torch.int64)

    total = torch.compile(step, backend="aot_eager", fullgraph=True)(rows, slots, cache)
    assert torch.equal(cache.cpu(), want) and int(total) == int(want.sum(dtype=torch.int64))


def test_another_format_is_a_table_entry(device, backend, gen, monkeypatch):
    """A format with a group that is no power of two and a short rope part (masked tiles)."""
    from dsagen import cache_formats

    fmt = cache_formats.MLACacheFormat("test_odd", latent_dim=96, rope_dim=3, group=48)
    monkeypatch.setitem(cache_formats.MLA_FORMATS, "test_odd", fmt)
    spec = dsagen.Spec(attention=dsagen.AttentionSpec(heads=1, qk_dim=99, v_dim=96),
                       cache=dsagen.CacheSpec(page_size=2, mla_format="test_odd"))
    kernels = dsagen.build(spec, backend=backend)
    n, n_pages = 9, 6
    rows = (torch.randn(n, 99, generator=gen) * torch.exp2(torch.randint(-20, 20, (n, 1), generator=gen))).bfloat16()
    slots = random_slots(gen, n, n_pages * 2, torch.int64)
    cache = mcw.poison_pattern(n_pages, 2, fmt.bytes_per_token, device)
    before = cache.clone()
    want = mcw.expected_cache(spec, rows, slots, before.cpu())
    kernels.mla_cache_write(rows.to(device), slots.to(device), cache)
    assert fmt.bytes_per_token == 110 and torch.equal(cache.cpu(), want) and not torch.equal(want, before.cpu())
