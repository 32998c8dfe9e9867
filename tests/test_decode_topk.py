"""The decode top-k with the page-table transform (dsagen/ops/decode_topk.py) against the canonical
selection (the k largest of each visible window, NaN first, ties to the lower position, mapped
through the block table): odd contexts and partial last pages in shuffled tables, next_n 1..4,
windows shorter than k and empty ones, one chunk and many chunks per row, both levels, candidate
overflow into the radix fallback, heavy ties, NaN / +-inf / +-0, sorted output identical across
splits, poisoned and strided outputs, column slices of the logits, the workload. The tests taking
the `backend` fixture run on Triton and TVM (whose kernels always emit the canonical bytes); the
split, level and fallback cases are Triton's (tests/test_tvm_decode.py covers the TVM paths)."""
from __future__ import annotations

import os

import math
import warnings

import numpy as np
import pytest
import torch

from dsagen.workloads import workload
import dsagen
import dsagen.ops.decode_topk_workload as dt
from dsagen.decode import positions_to_slots
from dsagen.ops import get_op
from dsagen.verify import Mismatch

SPLIT = {"block_n": 64, "chunk": 64, "waves": 2, "candidates": 64}  # many chunks per row on the CPU
# TVM: two rows per CPU task, 8-bit digits and the fewest candidates; small CUDA blocks
TVM_SMALL = {"cpu_rows_per_task": 2, "cpu_radix_bits": 8, "cpu_candidates": 1024, "cuda_threads": 128,
             "cuda_radix_bits": 4}
BAD_PAGES = (-(2**31), -1, 2**31 - 1)  # table entries past a context may be anything: never read


def make_spec(k=64, page_size=16):
    return dsagen.Spec(topk=dsagen.TopKSpec(k=k), cache=dsagen.CacheSpec(page_size=page_size))


def build(spec, backend="triton", **schedule):
    return dsagen.build(spec, backend=backend, schedules={"decode_topk": schedule} if schedule else None)


def small(backend, **extra):
    """The backend's schedule of small steps (SPLIT on Triton, TVM_SMALL on TVM), plus `extra` (on
    TVM only the knobs it has)."""
    if backend == "triton":
        return {**SPLIT, **extra}
    return {**TVM_SMALL, **{k: v for k, v in extra.items() if k == "sorted"}}


def make_case(gen, lens, next_n, page_size, max_blocks=None, n_cols=None, values=None):
    """logits [B * next_n, n_cols], context_lens, block_table: each request's pages drawn from one
    shared pool in a random order, entries past its context poisoned; logits N(0, 1) (or
    values(shape)) inside each row's window and NaN past it, so a read past a window would select it."""
    B = len(lens)
    pages = [max(0, -(-n // page_size)) for n in lens]
    max_blocks = max(pages + [1]) if max_blocks is None else max_blocks
    used = [min(u, max_blocks) for u in pages]  # a context longer than its table: the table's pages
    n_cols = max_blocks * page_size if n_cols is None else n_cols
    order = torch.randperm(sum(used) + 3, generator=gen).int()
    bad = torch.tensor(BAD_PAGES, dtype=torch.int32)
    table = bad[torch.randint(0, len(bad), (B, max_blocks), generator=gen)]
    taken = 0
    for b, u in enumerate(used):
        table[b, :u] = order[taken:taken + u]
        taken += u
    shape = (B * next_n, n_cols)
    logits = torch.randn(shape, generator=gen) if values is None else values(shape)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    visible = dt.visible_lengths(lens_t, next_n, n_cols)
    logits[torch.arange(n_cols)[None, :] >= visible[:, None]] = math.nan
    return logits, lens_t, table


def tie_keys(v: torch.Tensor) -> np.ndarray:
    """The kernel's keys of fp32 values (uint32, larger value larger key, NaNs one key, -0 on +0)."""
    bits = v.contiguous().view(torch.int32).numpy().view(np.uint32)
    negative = (bits - np.uint32(0x80000000)) <= np.uint32(0x7F800000)
    key = np.where(negative, ~bits, bits | np.uint32(0x80000000))
    key[np.isnan(v.numpy())] = 0xFFFFFFFF
    key[key == 0x7FFFFFFF] = 0x80000000
    return key


def path_of(window: torch.Tensor, k: int, radix_bits: int, levels: int, candidates: int) -> str:
    """Which way the kernel settles a row (a model of its plan), so a test can show it covers one."""
    if window.numel() <= k:
        return "whole window"
    key = tie_keys(window).astype(np.int64)
    n_bins = 1 << radix_bits
    rest, match = k, np.ones(key.shape, bool)
    for level in (1, 2):
        digit = (key >> (32 - level * radix_bits)) & (n_bins - 1)
        counts = np.bincount(digit[match], minlength=n_bins)
        at_or_above = np.cumsum(counts[::-1])[::-1]
        d = int(np.nonzero(at_or_above >= rest)[0].max())
        rest -= int(counts[d + 1:].sum())
        if counts[d] == rest:
            return f"bin taken whole at level {level}"
        if counts[d] <= candidates:
            return f"candidates at level {level}"
        if level == levels:
            return "radix fallback"
        match &= digit == d
    return "radix fallback"


def paths(logits, lens, next_n, k, radix_bits=8, levels=2, candidates=64):
    visible = dt.visible_lengths(lens, next_n, logits.shape[1])
    return {path_of(logits[r, :int(visible[r])], k, radix_bits, levels, candidates) for r in range(logits.shape[0])}


def run_and_check(kernels, case, device, sorted_out=False):
    """Run into a poisoned output, check the exact contract, and (sorted, or TVM, which always
    emits ascending positions) the canonical bytes."""
    spec = kernels.spec
    logits, lens, table = (t.to(device) for t in case)
    next_n = logits.shape[0] // lens.shape[0]
    out = torch.full((lens.shape[0], next_n, spec.topk.k), -7, dtype=torch.int32, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the interpreter's NumPy must not warn
        got = kernels.decode_topk(logits, lens, table, out=out)
    assert got.data_ptr() == out.data_ptr()
    dt.assert_decode_topk(got, logits, lens, table, spec.topk.k, spec.cache.page_size)
    if sorted_out or kernels.backend == "tvm":
        ref = dt.decode_topk_reference(logits, lens, table, spec.topk.k, spec.cache.page_size)
        assert torch.equal(got.cpu(), ref)
    return got.cpu()


CASES = [
    # B, next_n, page_size, k, context_lens, max_blocks (None: the longest context's)
    (3, 2, 16, 64, [300, 37, 129], None),  # partial last pages, a context shorter than k
    (2, 1, 64, 100, [1000, 65], 17),  # next_n 1, odd k, unused table entries
    (2, 4, 16, 64, [2, 250], None),  # next_n 4, a context shorter than next_n (empty windows)
    (4, 3, 1, 64, [64, 65, 0, 66], None),  # page size 1, windows around k, an empty request
    (2, 2, 16, 64, [700, 900], 30),  # contexts longer than the table's 480 columns: clamped
]


@pytest.mark.parametrize("schedule", ["default", "small"], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("B,next_n,ps,k,lens,max_blocks", CASES,
                         ids=[f"B{c[0]}-N{c[1]}-C{max(c[4])}-K{c[3]}-p{c[2]}" for c in CASES])
def test_matches_the_canonical_selection(device, gen, backend, schedule, B, next_n, ps, k, lens, max_blocks):
    kernels = build(make_spec(k, ps), backend, **(small(backend) if schedule == "small" else {}))
    case = make_case(gen, lens, next_n, ps, max_blocks)
    got = run_and_check(kernels, case, device)
    visible = dt.visible_lengths(case[1], next_n, case[0].shape[1])
    for r in range(B * next_n):  # -1 exactly past min(k, visible)
        n = min(k, int(visible[r]))
        assert (got.reshape(-1, k)[r, :n] >= 0).all() and (got.reshape(-1, k)[r, n:] == -1).all()


def test_positions_past_the_table_are_outside_the_window(device, gen, backend):
    """Logits wider than the block table (a context longer than its table): a position past the
    table has no page, so the window stops at the table's last position. The logits past it are
    +inf (they would rank first if read); every row gets 64 distinct slots of its own pages (they
    used to map through the table's last page, as repeated slots)."""
    spec = make_spec(64, 16)
    logits, lens, table = make_case(gen, [700, 650], 1, 16, max_blocks=20, n_cols=600)
    logits[:, 320:] = math.inf
    for schedule in ({}, small(backend)):
        got = run_and_check(build(spec, backend, **schedule), (logits, lens, table), device)
        for b in range(2):
            want = positions_to_slots(dt.top_positions(logits[b, :320], 64)[None], table[b:b + 1], 16, 1)
            assert torch.equal(torch.sort(got[b, 0]).values, torch.sort(want.reshape(-1)).values)
            assert torch.unique(got[b, 0]).numel() == 64 and (got[b, 0] >= 0).all()


# entries that give no slot: negative ones, and those whose slots do not fit an int32 (2**27 * 16 is
# 2**31; 2**28 * 16 would wrap to slot 0); (2**27 - 1) * 16 + 15 = 2**31 - 1 still fits
NO_SLOT = (-(2**31), -1, 2**27, 2**27 + 1, 2**28, 2**31 - 1)


def test_table_entries_that_give_no_slot_emit_minus_one(device, gen, backend):
    """Pages named by negative entries or by entries whose slots would not fit an int32 are in the
    window (the selection does not read the table) but emit -1, never a wrapped slot; the largest
    page whose slots fit int32 maps to the slots up to 2**31 - 1."""
    spec = make_spec(8, 16)
    logits = torch.randn(2, 2, 8, 16, generator=gen)
    lens = torch.tensor([128, 128], dtype=torch.int32)
    table = torch.tensor([[NO_SLOT[0], 3, NO_SLOT[1], 2**27 - 1, NO_SLOT[2], 5, NO_SLOT[3], 7],
                          [0, NO_SLOT[4], 2, NO_SLOT[5], 4, NO_SLOT[0], 6, NO_SLOT[4]]], dtype=torch.int32)
    no_slot = torch.isin(table, torch.tensor(NO_SLOT, dtype=torch.int32))
    logits += torch.where(no_slot, -10.0, 0.0)[:, None, :, None]
    logits[..., 0] += torch.where(no_slot, 20.0, 0.0)[:, None, :]  # of such pages, only the first positions win
    logits[0, :, 3, 15] += 5.0  # and the slot 2**31 - 1
    logits = logits.reshape(4, 128)
    for schedule in ({}, small(backend)):
        got = run_and_check(build(spec, backend, **schedule), (logits, lens, table), device)
        ref = dt.decode_topk_reference(logits, lens, table, 8, 16)
        assert torch.equal(torch.sort(got, -1).values, torch.sort(ref, -1).values)
        assert ((got == -1).sum(-1) == 4).all()  # the four winners on pages without slots
        assert (got[0] == 2**31 - 1).any(-1).all()
        slots = got[got >= 0].long()
        assert ((slots // 16)[:, None] == torch.tensor([0, 2, 3, 4, 5, 6, 7, 2**27 - 1])).any(1).all()


@pytest.mark.parametrize("levels,radix_bits", [(2, 8), (1, 8), (2, 10)], ids=["l2-r8", "l1-r8", "l2-r10"])
def test_both_levels_and_the_fallback(device, gen, levels, radix_bits):
    """Rows of 2000 keys with few candidates, settled at level 1 or 2 or, when even the last bin
    overflows the candidates, by the radix fallback. Row 0: 60 keys in [3, 4), ten keys of 2.0
    (four are needed: the four lowest positions), the rest small; rows 1-3: N(5, 1e-3), N(0, 100)
    and N(1000, 1) (2000 keys in one octave)."""
    spec = make_spec(64, 16)
    kernels = build(spec, **SPLIT, levels=levels, radix_bits=radix_bits)

    def values(shape):
        x = torch.randn(shape, generator=gen) * torch.tensor([0.1, 1e-3, 100.0, 1.0])[:, None]
        x += torch.tensor([0.0, 5.0, 0.0, 1000.0])[:, None]
        spots = torch.randperm(2001, generator=gen)
        x[0, spots[:60]] = 3.0 + torch.rand(60, generator=gen)
        x[0, spots[60:70]] = 2.0
        return x

    case = make_case(gen, [2001, 2001], 2, 16, values=values)
    run_and_check(kernels, case, device)
    want = {"radix fallback"} | ({"candidates at level 2"} if levels == 2 else set())
    want |= {"candidates at level 1"} if radix_bits == 10 else set()  # row 0: [2, 3) and [3, 4) apart
    assert want <= paths(case[0], case[1], 2, 64, radix_bits, levels, 64)


def test_windows_of_at_most_k_are_taken_whole_in_order(device, gen, backend):
    spec = make_spec(64, 16)
    kernels = build(spec, backend, **small(backend))
    case = make_case(gen, [64, 30, 1], 1, 16)
    got = run_and_check(kernels, case, device)
    table = case[2]
    for b, n in enumerate([64, 30, 1]):
        pos = torch.arange(n)
        assert torch.equal(got[b, 0, :n], (table[b].long()[pos // 16] * 16 + pos % 16).int())


@pytest.mark.parametrize("kind", ["all-equal", "four-values", "two-values-spread"])
def test_ties_go_to_the_lower_position(device, gen, backend, kind):
    spec = make_spec(64, 16)
    values = {
        "all-equal": lambda s: torch.full(s, 0.5),
        "four-values": lambda s: torch.randint(0, 4, s, generator=gen).float() - 1.5,
        "two-values-spread": lambda s: torch.where(torch.rand(s, generator=gen) < 0.02, 7.0, -3.0),
    }[kind]
    case = make_case(gen, [900, 333], 2, 16, values=values)
    schedules = ({}, SPLIT, {**SPLIT, "levels": 1}) if backend == "triton" else ({}, TVM_SMALL)
    for schedule in schedules:
        got = run_and_check(build(spec, backend, **schedule), case, device)
        if kind == "all-equal":  # the first 64 positions of every row
            for b in range(2):
                pos = torch.arange(64)
                want = (case[2][b].long()[pos // 16] * 16 + pos % 16).int()
                assert torch.equal(torch.sort(got[b, 0]).values, torch.sort(want).values)
    if kind != "two-values-spread":
        assert "radix fallback" in paths(case[0], case[1], 2, 64)


def test_nan_infinities_and_signed_zeros(device, gen, backend):
    """NaN ranks above +inf and every NaN ties with every other, whatever its sign and payload;
    -0 ties with +0; -inf is an ordinary key below every finite value."""
    k, n = 64, 500
    rows = torch.randn(8, 512, generator=gen)  # 500 visible of 32 pages of 16
    nan_payloads = torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF], dtype=torch.int64)
    nan_payloads = nan_payloads.to(torch.int32).view(torch.float32)
    rows[0, torch.randperm(n, generator=gen)[:20]] = nan_payloads[torch.randint(0, 4, (20,), generator=gen)]
    rows[1, torch.randperm(n, generator=gen)[:100]] = nan_payloads[torch.randint(0, 4, (100,), generator=gen)]
    rows[2] = -math.inf
    rows[2, 7] = 1.0
    rows[3, torch.randperm(n, generator=gen)[:80]] = math.inf
    rows[4] = torch.where(torch.rand(512, generator=gen) < 0.5, -0.0, 0.0)
    rows[5] = torch.where(torch.rand(512, generator=gen) < 0.9, -0.0, -1e-45)  # -0 and the negative subnormal
    rows[6] = torch.randn(512, generator=gen) * 1e-40  # subnormals
    rows[7, :] = math.nan
    spec = make_spec(k, 16)
    case = make_case(gen, [n] * 8, 1, 16, values=lambda s: rows.clone())
    for schedule in ({}, small(backend), small(backend, sorted=1)):
        got = run_and_check(build(spec, backend, **schedule), case, device, sorted_out=bool(schedule.get("sorted")))
    # row 7 (all NaN): the first k positions; row 1 (100 NaN): its first 64 NaN positions
    table = case[2]
    for r, pos in ((7, torch.arange(k)), (1, torch.nonzero(torch.isnan(rows[1])).flatten()[:k])):
        want = (table[r].long()[pos // 16] * 16 + pos % 16).int()
        assert torch.equal(torch.sort(got[r, 0]).values, torch.sort(want).values)


@pytest.mark.parametrize("k,ps", [(64, 16), (100, 64)], ids=["K64-p16", "K100-p64"])
def test_sorted_output_is_canonical_across_splits(device, gen, k, ps):
    """sorted = 1: ascending positions, the same bytes for one chunk or many, one level or two.
    Unsorted, the order depends on no split knob either (each level places its keys in position
    order), only on the levels and candidates knobs, which decide the way a row is settled."""
    spec = make_spec(k, ps)
    case = make_case(gen, [1500, 777, 40], 2, ps)
    schedules = [{"sorted": 1}, {**SPLIT, "sorted": 1}, {**SPLIT, "sorted": 1, "levels": 1, "radix_bits": 10}]
    results = [run_and_check(build(spec, **s), case, device, sorted_out=True) for s in schedules]
    assert all(torch.equal(results[0], r) for r in results[1:])
    splits = (SPLIT, {**SPLIT, "chunk": 256, "waves": 1}, {**SPLIT, "block_n": 1024, "chunk": 1024})
    unsorted = [run_and_check(build(spec, **s), case, device) for s in splits]
    assert all(torch.equal(unsorted[0], r) for r in unsorted[1:])


def test_k2048_on_a_long_row(device, gen, backend):
    spec = make_spec(2048, 64)
    case = make_case(gen, [5000, 2100], 2, 64)
    run_and_check(build(spec, backend), case, device)


def test_strided_logits_and_outputs(device, gen, backend):
    """A column slice of wider logits (row stride > n_cols, no 16-byte alignment) and an output that
    is a slice of a larger buffer: the same slots, nothing written outside."""
    spec = make_spec(64, 16)
    kernels = build(spec, backend, **small(backend))
    logits, lens, table = make_case(gen, [300, 129], 2, 16)
    wide = torch.full((4, logits.shape[1] + 9), math.inf)
    wide[:, 3:3 + logits.shape[1]] = logits
    table_wide = torch.full((2, table.shape[1] + 4), 2**31 - 1, dtype=torch.int32)
    table_wide[:, 1:1 + table.shape[1]] = table
    wide, lens_d, table_wide = wide.to(device), lens.to(device), table_wide.to(device)
    args = (wide[:, 3:3 + logits.shape[1]], lens_d, table_wide[:, 1:1 + table.shape[1]])
    assert not args[0].is_contiguous() and not args[2].is_contiguous()
    big = torch.full((3, 5, 64), -7, dtype=torch.int32, device=device)
    got = kernels.decode_topk(*args, out=big[1:, 1:3])
    dt.assert_decode_topk(got, logits, lens, table, 64, 16)
    assert (big[0] == -7).all() and (big[:, 0] == -7).all() and (big[:, 3:] == -7).all()
    assert torch.equal(got.cpu(), run_and_check(kernels, (logits, lens, table), device))


def test_run_call_and_the_torch_op_agree(device, gen, backend):
    spec = make_spec(64, 16)
    kernels = build(spec, backend, **small(backend))
    case = tuple(t.to(device) for t in make_case(gen, [200, 70], 2, 16))
    a = kernels.run("decode_topk", *case)
    b = kernels.decode_topk(*case)
    c = torch.ops.dsagen.decode_topk(*case, kernels.handle)
    assert torch.equal(a, b) and torch.equal(a, c) and a.shape == (2, 2, 64) and a.dtype == torch.int32
    fake = get_op("decode_topk").fake(spec, *(t.to("meta") for t in case))
    assert fake.shape == a.shape and fake.dtype == torch.int32


def test_a_cuda_graph_captures_the_call(device, gen, backend):
    """No host sync and no value-dependent size: the captured call replays on new contexts and logits."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        pytest.skip("a capture allocates from PyTorch's caching allocator, which is off (as under memcheck)")
    from dsagen.timing import capture_cuda_graph

    spec = make_spec(2048, 64)
    kernels = build(spec, backend, sorted=1)
    logits, lens, table = (t.to(device) for t in make_case(gen, [40000, 3000, 9000], 2, 64, max_blocks=700))
    kernels.prepare(logits.shape[0], logits.shape[1], device)
    graph, got = capture_cuda_graph(lambda: kernels.decode_topk(logits, lens, table))
    for _ in range(2):
        # new contexts within the pages each request's table maps (entries past them are poison)
        lens.copy_((torch.tensor([40000, 3000, 9000]) * torch.rand(3, generator=gen)).int())
        logits.copy_(torch.randn(logits.shape, generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        dt.assert_decode_topk(got, logits, lens, table, 2048, 64)


def test_int32_extreme_contexts_and_empty_shapes(device, gen, backend):
    spec = make_spec(64, 16)
    kernels = build(spec, backend, **small(backend))
    run_and_check(kernels, make_case(gen, [-(2**31), 2**31 - 1, 5], 2, 16, max_blocks=12), device)
    i32 = torch.int32
    empty = kernels.decode_topk(torch.zeros(0, 32, device=device), torch.zeros(0, dtype=i32, device=device),
                                torch.zeros(0, 2, dtype=i32, device=device))
    assert empty.shape == (0, 1, 64)
    no_cols = kernels.decode_topk(torch.zeros(4, 0, device=device), torch.tensor([3, 9], dtype=i32, device=device),
                                  torch.zeros(2, 0, dtype=i32, device=device))
    assert no_cols.shape == (2, 2, 64) and (no_cols == -1).all()
    no_table = kernels.decode_topk(torch.randn(2, 40, device=device), torch.tensor([30, 9], dtype=i32, device=device),
                                   torch.zeros(2, 0, dtype=i32, device=device))
    assert (no_table == -1).all()  # no page to map a position to


def test_bad_tensors_name_the_argument(device, backend):
    kernels = build(make_spec(64, 16), backend)
    i32 = torch.int32
    x = torch.zeros(4, 48, device=device)
    lens = torch.zeros(2, dtype=i32, device=device)
    table = torch.zeros(2, 3, dtype=i32, device=device)
    cases = [
        ("logits", lambda: kernels.decode_topk(x.double(), lens, table)),
        ("logits", lambda: kernels.decode_topk(x[0], lens, table)),
        ("logits", lambda: kernels.decode_topk(x.t().contiguous().t(), lens, table)),  # columns strided
        ("logits", lambda: kernels.decode_topk(x[:3], lens, table)),  # 3 rows for 2 requests
        ("context_lens", lambda: kernels.decode_topk(x, lens.long(), table)),
        ("context_lens", lambda: kernels.decode_topk(x, torch.zeros(4, dtype=i32, device=device)[::2], table)),
        ("context_lens", lambda: kernels.decode_topk(x, torch.zeros(0, dtype=i32, device=device), table)),
        ("block_table", lambda: kernels.decode_topk(x, lens, table[:1])),
        ("block_table", lambda: kernels.decode_topk(x, lens, table.long())),
        ("block_table", lambda: kernels.decode_topk(x, lens, table.t().contiguous().t())),
        ("out", lambda: kernels.decode_topk(x, lens, table, out=torch.zeros(2, 2, 63, dtype=i32, device=device))),
        ("out", lambda: kernels.decode_topk(x, lens, table, out=torch.zeros(4, 64, dtype=i32, device=device))),
        ("out", lambda: kernels.decode_topk(x, lens, table, out=torch.zeros(2, 2, 64, device=device))),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            call()


def test_offered_only_with_a_cache_on_both_backends(backend):
    op = get_op("decode_topk")
    spec = make_spec()
    assert op.enabled(spec, backend)
    assert not op.enabled(dsagen.Spec(topk=spec.topk), backend)
    assert "decode_topk" in dsagen.build(spec, backend=backend).kernels()
    assert "decode_topk" not in dsagen.build(dsagen.Spec(), backend=backend).kernels()
    assert build(make_spec(2048, 64)).resolve("decode_topk", device_type="cpu").module_name.startswith(
        "decode_topk_k2048_p64_")


def test_workload_inputs_check_and_naive(device, backend):
    """What the tuner and `dsagen bench` run: B requests x next_n = 2 over SKV tokens, pages shuffled."""
    spec = make_spec(64, 16)
    op = get_op("decode_topk")
    kernels = build(spec, backend, **small(backend))
    inputs = workload(op).inputs(spec, 3, 150, device, seed=1)
    logits, lens, table = inputs
    assert logits.shape == (6, 160) and table.shape == (3, 10) and (lens == 150).all()
    assert sorted(table.reshape(-1).tolist()) == list(range(30))
    assert torch.isinf(logits[1, 150:]).all() and torch.isinf(logits[0, 149:]).all()
    assert torch.isfinite(logits[0, :149]).all()
    out = workload(op).poisoned_outputs(spec, inputs)["out"]
    assert out.shape == (3, 2, 64) and (out == -7).all()
    call = op.check_args(spec, *inputs, out=out)
    assert (call.S, call.SKV) == (6, 160) and workload(op).call_shape(3, 150) == (6, 150)
    result = kernels.launch("decode_topk", inputs, {"out": out})
    assert "3 requests x 2 rows" in workload(op).check(spec, inputs, result, torch.tensor([0, 1, 2]))
    ref = workload(op).reference(spec, *inputs)
    assert torch.equal(torch.sort(result.cpu(), -1).values, torch.sort(ref, -1).values)
    broken = result.clone()
    broken[1, 0, 5] = broken[1, 0, 6]  # a repeated slot
    with pytest.raises(Mismatch, match="repeated"):
        workload(op).check(spec, inputs, broken, torch.tensor([1]))
    broken = result.clone()
    broken[2, 1, 3] = -1
    with pytest.raises(Mismatch):
        workload(op).check(spec, inputs, broken, torch.tensor([2]))
    naive = workload(op).naive(spec, inputs)()
    assert naive.shape == result.shape
    assert torch.equal(torch.sort(naive.cpu(), -1).values, torch.sort(ref, -1).values)  # no ties in N(0, 1)
    info = workload(op).shape_info(spec, 3, 150)
    assert info["next_n"] == 2 and info["k"] == 64 and info["page_size"] == 16
    flops, nbytes = op.cost(spec).evaluate(workload(op).sizes(4, 131072))
    assert flops == 0 and nbytes == pytest.approx(8 * (131072 - 0.5) * 4 + 16 + 8 * 64 * 8)
    assert workload(op).bench_warning(spec, 3, 64) and not workload(op).bench_warning(spec, 3, 65)


def test_a_wrong_tie_break_or_padding_is_caught():
    """The check itself: a selection of the right values but the higher of two tied positions, a
    slot of no visible position, a missing -1."""
    spec = make_spec(4, 4)
    logits = torch.tensor([[1.0, 5.0, 5.0, 0.0, 5.0, 9.0, -math.inf, -math.inf]])
    lens = torch.tensor([6], dtype=torch.int32)
    table = torch.tensor([[3, 0]], dtype=torch.int32)
    ref = dt.decode_topk_reference(logits, lens, table, 4, 4)
    assert ref.tolist() == [[[13, 14, 0, 1]]]  # positions 1, 2, 4, 5 through pages 3 and 0
    dt.assert_decode_topk(ref, logits, lens, table, 4, 4)
    swapped = positions_to_slots(torch.tensor([[1, 3, 4, 5]]), table, 4, 1)  # 3 holds 0.0, not 5.0
    with pytest.raises(Mismatch, match="largest"):
        dt.assert_decode_topk(swapped, logits, lens, table, 4, 4)
    lens2 = torch.tensor([8], dtype=torch.int32)
    logits2 = torch.tensor([[1.0, 5.0, 5.0, 0.0, 9.0, 5.0, 2.0, 3.0]])
    higher = positions_to_slots(torch.tensor([[1, 4, 5, 2]]), table, 4, 1)
    lower = positions_to_slots(torch.tensor([[1, 2, 4, 7]]), table, 4, 1)
    with pytest.raises(Mismatch, match="largest"):
        dt.assert_decode_topk(lower, logits2, lens2, table, 4, 4)
    dt.assert_decode_topk(higher, logits2, lens2, table, 4, 4)
    tie_lens = torch.tensor([6], dtype=torch.int32)
    tie_logits = torch.tensor([[5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 0.0, 0.0]])
    late = positions_to_slots(torch.tensor([[0, 1, 2, 4]]), table, 4, 1)
    with pytest.raises(Mismatch, match="lowest"):
        dt.assert_decode_topk(late, tie_logits, tie_lens, table, 4, 4)
    foreign = torch.tensor([[[13, 14, 0, 99]]], dtype=torch.int32)
    with pytest.raises(Mismatch, match="no visible position"):
        dt.assert_decode_topk(foreign, logits, lens, table, 4, 4)
    short = torch.tensor([[[12, 13, 14, 7]]], dtype=torch.int32)
    with pytest.raises(Mismatch, match="-1"):
        dt.assert_decode_topk(short, logits, torch.tensor([3], dtype=torch.int32), table, 4, 4)
