"""The decode indexer over the paged fp8 key cache against its float64 reference: partial last pages,
pages of requests interleaved, unused table entries out of range, contexts shorter than next_n,
next_n 1..5, heads 1/3/16/64/128, head_dim 128/40/50, page sizes 1/16/64, poisoned outputs; on both
backends (the schedule tests are Triton's: tests/test_tvm_decode.py varies the TVM schedules)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dsagen.workloads import workload
import dsagen
import dsagen.ops.paged_indexer_workload as paged
from dsagen.cache_formats import pack_index_pages
from dsagen.ops import get_op
from dsagen.verify import Mismatch, assert_close

BAD_PAGES = (-(2**31), -1, 2**31 - 1)  # plus n_pages: table entries past a context may be anything
FP8_NAN = 0x7F


def make_spec(heads=16, head_dim=128, page_size=16):
    return dsagen.Spec(indexer=dsagen.IndexerSpec(heads=heads, head_dim=head_dim),
                       cache=dsagen.CacheSpec(page_size=page_size))


def make_case(gen, spec, lens, next_n, max_blocks=None, spare_pages=3):
    """q, cache, weights, context_lens, block_table: each request's pages drawn at random from one
    shared pool (requests interleaved), unused table entries out of range, the slots of partial last
    pages and the spare pages poisoned with NaN keys and scales (never visible, so never read)."""
    ix, ps = spec.indexer, spec.cache.page_size
    n_req = len(lens)
    used = [max(0, -(-n // ps)) for n in lens]
    max_blocks = max(used + [1]) if max_blocks is None else max_blocks
    used = [min(u, max_blocks) for u in used]  # a context longer than its table: the table's pages
    n_pages = sum(used) + spare_pages
    keys = torch.randn(n_pages * ps, ix.head_dim, generator=gen) * torch.logspace(-2, 2, n_pages * ps)[:, None]
    codes, scales = paged.quantize_index_keys(keys)
    order = torch.randperm(n_pages, generator=gen)
    table = torch.empty(n_req, max_blocks, dtype=torch.int32)
    bad = list(BAD_PAGES) + [n_pages]
    table[:] = torch.tensor(bad, dtype=torch.int32)[torch.randint(0, len(bad), (n_req, max_blocks), generator=gen)]
    owner = torch.full((n_pages * ps,), False)
    taken = 0
    for b, n in enumerate(lens):
        pages = order[taken:taken + used[b]]
        taken += used[b]
        table[b, :used[b]] = pages.int()
        for i, p in enumerate(pages.tolist()):
            owner[p * ps:p * ps + min(ps, n - i * ps)] = True
    codes = codes.view(torch.uint8).clone()
    codes[~owner] = FP8_NAN
    scales = scales.clone()
    scales[~owner] = math.nan
    cache = pack_index_pages(codes.view(torch.float8_e4m3fn), scales, ps)
    q = (torch.randn(n_req, next_n, ix.heads, ix.head_dim, generator=gen) * 3).to(torch.float8_e4m3fn)
    weights = torch.randn(n_req * next_n, ix.heads, generator=gen) / ix.heads
    return q, cache, weights, torch.tensor(lens, dtype=torch.int32), table


def poisoned(q, table, spec):
    return torch.full((q.shape[0] * q.shape[1], table.shape[1] * spec.cache.page_size), math.nan)


def run_and_check(kernels, spec, case, device):
    case = tuple(t.to(device) for t in case)
    out = poisoned(case[0], case[4], spec).to(device)
    got = kernels.paged_indexer(*case, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = paged.paged_indexer_reference(*case)
    assert_close("indexer.logits.fp8_e4m3", got, ref)
    return got, ref


CASES = [
    # B, next_n, heads, head_dim, page_size, context_lens (max_blocks: the longest, or given)
    (3, 2, 16, 128, 16, [37, 100, 1], None),  # partial last pages, blocks spanning pages
    (2, 1, 1, 40, 1, [5, 0], 9),  # page size 1, an empty request, unused entries
    (4, 3, 3, 40, 64, [2, 70, 130, -3], 4),  # contexts shorter than next_n and negative
    (2, 4, 64, 128, 64, [200, 3], None),  # next_n 4, V3.2 heads and pages
    (3, 2, 3, 50, 16, [33, 20, 16], 5),  # head_dim 50: scales at addresses no multiple of 4
    (2, 2, 1, 128, 16, [1, 2], 1),  # visible lengths 0 and 1, 1 and 2
    (2, 1, 64, 128, 16, [1100, 530], None),  # several programs per request, next_n 1
    (2, 2, 3, 40, 16, [70, 5], 2),  # a context longer than its table: only the table's columns
    (3, 2, 3, 40, 16, [-(2**31), 2**31 - 1, 9], 40),  # int32 extremes: none visible, the whole table
]


@pytest.mark.parametrize("B,next_n,H,D,ps,lens,max_blocks", CASES,
                         ids=[f"B{c[0]}-n{c[1]}-H{c[2]}-D{c[3]}-p{c[4]}" for c in CASES])
def test_paged_indexer_matches_reference(device, backend, gen, B, next_n, H, D, ps, lens, max_blocks):
    spec = make_spec(H, D, ps)
    kernels = dsagen.build(spec, backend=backend)
    got, ref = run_and_check(kernels, spec, make_case(gen, spec, lens, next_n, max_blocks), device)
    assert got.shape == (B * next_n, ref.shape[1])
    for b, n in enumerate(lens):  # the visible prefix, row by row
        for j in range(next_n):
            visible = max(0, min(n - next_n + j + 1, got.shape[1]))
            assert torch.isfinite(got[b * next_n + j, :visible]).all()
            assert (got[b * next_n + j, visible:] == -math.inf).all()


SCHEDULES = [
    {"block_n": 32, "block_h": 16, "key_blocks": 1, "num_warps": 4, "num_stages": 1, "key_rows": 0},  # inside one page
    {"block_n": 128, "block_h": 4, "key_blocks": 2, "num_warps": 8, "num_stages": 2, "key_rows": 0},  # pages per block, head loop
    {"block_n": 64, "block_h": 1, "key_blocks": 16, "num_warps": 4, "num_stages": 3, "key_rows": 0},  # one head per dot step
    # keys as the dots' rows: within one page; pages per block with a head loop; one head step
    {"block_n": 32, "block_h": 16, "key_blocks": 1, "num_warps": 4, "num_stages": 1, "key_rows": 1},
    {"block_n": 128, "block_h": 4, "key_blocks": 2, "num_warps": 8, "num_stages": 2, "key_rows": 1},
    {"block_n": 64, "block_h": 16, "key_blocks": 16, "num_warps": 4, "num_stages": 3, "key_rows": 1},
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "n{block_n}-h{block_h}-kb{key_blocks}-kr{key_rows}".format(**s))
@pytest.mark.parametrize("ps", [16, 64])
def test_paged_indexer_schedules_agree(device, gen, schedule, ps):
    spec = make_spec(16, 128, ps)
    kernels = dsagen.build(spec, schedules={"paged_indexer": schedule})
    assert kernels.resolve("paged_indexer").point == schedule
    run_and_check(kernels, spec, make_case(gen, spec, [150, 9, 64], 3), device)


@pytest.mark.parametrize("next_n,block_h", [(3, 128), (5, 64)], ids=["n3-h128", "n5-h64"])
def test_many_query_rows_take_fewer_heads_per_step(device, gen, next_n, block_h):
    """More than 256 (query, head) rows per dot: the launcher halves the heads per step."""
    spec = make_spec(128, 128, 16)
    schedule = {"block_n": 32, "block_h": block_h, "key_blocks": 2, "num_warps": 4, "num_stages": 2}
    kernels = dsagen.build(spec, schedules={"paged_indexer": schedule})
    run_and_check(kernels, spec, make_case(gen, spec, [40, next_n + 1], next_n), device)


def test_noncontiguous_inputs_and_strided_pages(device, backend, gen):
    spec = make_spec(3, 40, 16)
    kernels = dsagen.build(spec, backend=backend)
    q, cache, w, lens, table = make_case(gen, spec, [45, 17, 30], 2, max_blocks=4)
    n_pages = cache.shape[0]
    wide = torch.zeros(2 * n_pages, 16, 1, 44, dtype=torch.uint8)
    wide[1::2] = cache  # every other page: the page stride is two pages
    q_pad = torch.zeros(3, 2, 5, 64, dtype=torch.float8_e4m3fn).view(torch.uint8)
    q_pad[:, :, 1:4, :40] = q.view(torch.uint8)
    table_pad = torch.full((3, 7), -1, dtype=torch.int32)
    table_pad[:, 2:6] = table
    w_pad = torch.zeros(6, 9)
    w_pad[:, 3:6] = w
    q_pad, wide, w_pad, lens, table_pad = (t.to(device) for t in (q_pad, wide, w_pad, lens, table_pad))
    args = (q_pad.view(torch.float8_e4m3fn)[:, :, 1:4, :40], wide[1::2], w_pad[:, 3:6], lens, table_pad[:, 2:6])
    assert not any(t.is_contiguous() for t in (args[0], args[1], args[2], args[4]))
    out_pad = torch.full((6, 80), math.nan, device=device)
    got = kernels.paged_indexer(*args, out=out_pad[:, 8:72])
    ref = paged.paged_indexer_reference(q, cache, w, lens, table)
    assert_close("indexer.logits.fp8_e4m3", got, ref)
    assert torch.isnan(out_pad[:, :8]).all() and torch.isnan(out_pad[:, 72:]).all()  # nothing outside out
    raw = torch.zeros(cache.numel() + 1, dtype=torch.uint8, device=device)
    shifted = raw[1:].view(cache.shape)  # scales at odd addresses: read byte by byte
    shifted.copy_(cache)
    assert shifted.data_ptr() % 4 == 1
    got = kernels.paged_indexer(args[0], shifted, *args[2:])
    assert_close("indexer.logits.fp8_e4m3", got, ref)
    with pytest.raises(ValueError, match="^context_lens"):
        kernels.paged_indexer(*args[:3], torch.zeros(6, dtype=torch.int32, device=device)[::2], args[4])


def test_run_call_and_the_torch_op_agree(device, backend, gen):
    spec = make_spec(3, 40, 1)
    kernels = dsagen.build(spec, backend=backend)
    case = tuple(t.to(device) for t in make_case(gen, spec, [6, 3], 2))
    a = kernels.run("paged_indexer", *case)
    b = kernels.paged_indexer(*case)
    c = torch.ops.dsagen.paged_indexer(*case, kernels.handle)
    assert torch.equal(a, b) and torch.equal(a, c)
    fake = get_op("paged_indexer").fake(spec, *(t.to("meta") for t in case))
    assert fake.shape == a.shape and fake.dtype == torch.float32


def test_traced_by_torch_compile_as_one_node(device, backend, gen):
    import torch._dynamo

    spec = make_spec(3, 40, 16)
    kernels = dsagen.build(spec, backend=backend)
    case = tuple(t.to(device) for t in make_case(gen, spec, [20, 7], 2))
    eager = kernels.paged_indexer(*case)
    torch._dynamo.reset()
    assert torch._dynamo.explain(kernels.paged_indexer)(*case).graph_break_count == 0
    assert torch.equal(torch.compile(kernels.paged_indexer, fullgraph=True)(*case), eager)


def test_nan_propagates_as_in_the_prefill_indexer(device, backend, gen):
    """NaN in q[b, j] or w[row]: that row's visible logits; in a key or a scale: that column of
    the rows that see it. -inf stays -inf."""
    spec = make_spec(3, 40, 16)
    kernels = dsagen.build(spec, backend=backend)
    q, cache, w, lens, table = make_case(gen, spec, [40, 25], 2)
    qb = q.view(torch.uint8)
    qb[0, 1, 2, 5] = FP8_NAN  # row 1
    w[2, 0] = math.nan  # row 2 (request 1, query 0)
    page, slot = int(table[1, 1]), 7  # token 23 of request 1
    cache[page].reshape(-1)[slot * 40 + 3] = FP8_NAN
    page, slot = int(table[0, 2]), 1  # token 33 of request 0: its scale
    cache[page].reshape(-1)[16 * 40 + slot * 4:16 * 40 + slot * 4 + 4] = \
        torch.tensor([math.nan]).view(torch.uint8)
    case = tuple(t.to(device) for t in (q, cache, w, lens, table))
    got = kernels.paged_indexer(*case, out=poisoned(q, table, spec).to(device)).cpu()
    ref = paged.paged_indexer_reference(*case)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.isnan(got[1, :40]).all() and torch.isnan(got[2, :24]).all() and not torch.isnan(got[3, :23]).any()
    assert torch.isnan(got[3, 23]) and torch.isnan(got[0, 33]) and torch.isnan(got[1, 33])
    finite = ~torch.isnan(ref)
    assert_close("indexer.logits.fp8_e4m3", got[finite], ref[finite])
    with pytest.raises(Mismatch, match="NaN"):
        assert_close("indexer.logits.fp8_e4m3", got, ref)


def between_poison_pages(cache, spare=2):
    """The cache as a view into a buffer with `spare` pages of 0xFF bytes (NaN fp8 keys, NaN scales)
    before and after it: a key read through an entry outside [0, n_pages) brings NaN."""
    wide = torch.full((cache.shape[0] + 2 * spare, *cache.shape[1:]), 0xFF, dtype=torch.uint8, device=cache.device)
    wide[spare:spare + cache.shape[0]] = cache
    return wide[spare:spare + cache.shape[0]]


OUTSIDE_5_PAGES = (5, 6, 99, -1, 2**31 - 1, -(2**31))


def test_table_entries_outside_the_cache_name_no_page(device, backend, gen):
    """With 5 pages, an entry of 5, 6, 99, -1, 2**31 - 1 or -2**31 inside a context names no page:
    its tokens are -inf in every row (as past the context), nothing is read through it (the cache
    lies between pages of NaN), and the other tokens are unchanged."""
    spec = make_spec(3, 40, 16)
    kernels = dsagen.build(spec, backend=backend)
    keys, scales = paged.quantize_index_keys(torch.randn(5 * 16, 40, generator=gen))
    cache = pack_index_pages(keys, scales, 16)
    bad = OUTSIDE_5_PAGES
    table = torch.tensor([[0, bad[0], 1, bad[1]], [bad[2], 2, bad[3], 3], [4, bad[4], 0, bad[5]]], dtype=torch.int32)
    lens = torch.tensor([64, 60, 50], dtype=torch.int32)
    q = (torch.randn(3, 2, 3, 40, generator=gen) * 3).to(torch.float8_e4m3fn)
    w = torch.randn(6, 3, generator=gen)
    case = (q, between_poison_pages(cache.to(device)), w, lens, table)
    got, ref = run_and_check(kernels, spec, case, device)
    got = got.cpu()
    outside = (table < 0) | (table >= 5)
    assert (got.reshape(3, 2, 4, 16)[outside[:, None, :, None].expand(3, 2, 4, 16)] == -math.inf).all()
    assert not torch.isnan(got).any()
    inside = ref.reshape(3, 2, 4, 16)[~outside[:, None, :, None].expand(3, 2, 4, 16)]
    assert torch.isfinite(inside).sum() > 0.9 * inside.numel()  # the visible tokens of real pages


def test_empty_batches_and_tables(device, backend):
    spec = make_spec(3, 40, 16)
    kernels = dsagen.build(spec, backend=backend)
    q = torch.zeros(0, 2, 3, 40, dtype=torch.float8_e4m3fn, device=device)
    cache = torch.zeros(1, 16, 1, 44, dtype=torch.uint8, device=device)
    w = torch.zeros(0, 3, device=device)
    lens = torch.zeros(0, dtype=torch.int32, device=device)
    table = torch.zeros(0, 4, dtype=torch.int32, device=device)
    assert kernels.paged_indexer(q, cache, w, lens, table).shape == (0, 64)  # no request
    q1 = torch.zeros(2, 1, 3, 40, dtype=torch.float8_e4m3fn, device=device)
    lens = torch.tensor([5, 0], dtype=torch.int32, device=device)
    table = torch.zeros(2, 0, dtype=torch.int32, device=device)
    assert kernels.paged_indexer(q1, cache, torch.zeros(2, 3, device=device), lens, table).shape == (2, 0)  # no column


def test_bad_tensors_name_the_argument(device, backend):
    spec = make_spec(3, 40, 16)
    kernels = dsagen.build(spec, backend=backend)
    f8, i32 = torch.float8_e4m3fn, torch.int32
    q = torch.zeros(2, 2, 3, 40, dtype=f8, device=device)
    cache = torch.zeros(4, 16, 1, 44, dtype=torch.uint8, device=device)
    w = torch.zeros(4, 3, device=device)
    lens = torch.zeros(2, dtype=i32, device=device)
    table = torch.zeros(2, 3, dtype=i32, device=device)
    cases = [
        ("q", lambda: kernels.paged_indexer(q.to(torch.bfloat16), cache, w, lens, table)),
        ("q", lambda: kernels.paged_indexer(q[:, :, :2], cache, w, lens, table)),  # heads
        ("q", lambda: kernels.paged_indexer(q[0], cache, w, lens, table)),  # 3 dims
        ("q", lambda: kernels.paged_indexer(q[:, :0], cache, w[:0], lens, table)),  # next_n 0
        ("q", lambda: kernels.paged_indexer(q.transpose(2, 3).contiguous().transpose(2, 3), cache, w, lens, table)),
        ("index_cache", lambda: kernels.paged_indexer(q, cache.view(torch.int8), w, lens, table)),
        ("index_cache", lambda: kernels.paged_indexer(q, cache[:, :8], w, lens, table)),  # page size
        ("index_cache", lambda: kernels.paged_indexer(q, cache[..., :43], w, lens, table)),  # D + 4
        ("index_cache", lambda: kernels.paged_indexer(q, cache.reshape(4, 16, 44), w, lens, table)),
        ("index_cache", lambda: kernels.paged_indexer(q, torch.zeros(4, 16, 1, 88, dtype=torch.uint8, device=device)
                                                      [..., :44], w, lens, table)),  # pages not packed
        ("index_cache", lambda: kernels.paged_indexer(q, cache.to("meta"), w, lens, table)),  # device
        ("weights", lambda: kernels.paged_indexer(q, cache, w[:3], lens, table)),
        ("weights", lambda: kernels.paged_indexer(q, cache, w.double(), lens, table)),
        ("context_lens", lambda: kernels.paged_indexer(q, cache, w, lens.long(), table)),
        ("context_lens", lambda: kernels.paged_indexer(q, cache, w, lens[:1], table)),
        ("block_table", lambda: kernels.paged_indexer(q, cache, w, lens, table[:1])),
        ("block_table", lambda: kernels.paged_indexer(q, cache, w, lens, table.long())),
        ("block_table", lambda: kernels.paged_indexer(q, cache, w, lens, table.t().contiguous().t())),
        ("out", lambda: kernels.paged_indexer(q, cache, w, lens, table, out=torch.zeros(4, 47, device=device))),
        ("out", lambda: kernels.paged_indexer(q, cache, w, lens, table,
                                              out=torch.zeros(4, 48, dtype=torch.float64, device=device))),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            call()


def test_offered_only_with_a_cache(backend):
    op = get_op("paged_indexer")
    with_cache = make_spec()
    assert op.enabled(with_cache, backend)
    assert not op.enabled(dataclasses.replace(with_cache, cache=None), backend)
    assert "paged_indexer" in dsagen.build(with_cache, backend=backend).kernels()
    assert "paged_indexer" not in dsagen.build(dataclasses.replace(with_cache, cache=None), backend=backend).kernels()


def test_workload_inputs_check_and_naive(device, backend):
    """What the tuner and `dsagen bench` run: B requests x next_n = 2 over SKV tokens, pages shuffled."""
    spec = make_spec(16, 128, 16)
    op = get_op("paged_indexer")
    kernels = dsagen.build(spec, backend=backend)
    inputs = workload(op).inputs(spec, 3, 50, device, seed=1)
    q, cache, w, lens, table = inputs
    assert q.shape == (3, 2, 16, 128) and table.shape == (3, 4) and (lens == 50).all()
    assert sorted(table.reshape(-1).tolist()) == list(range(12))
    out = workload(op).poisoned_outputs(spec, inputs)["out"]
    assert out.shape == (6, 64) and torch.isnan(out).all()
    call = op.check_args(spec, *inputs, out=out)
    assert (call.S, call.SKV) == (6, 64)
    result = kernels.launch("paged_indexer", inputs, {"out": out})
    assert "3 requests x 2 rows" in workload(op).check(spec, inputs, result, torch.tensor([0, 1, 2]))
    broken = result.clone()
    broken[3, 10] += 1.0
    with pytest.raises(Mismatch):
        workload(op).check(spec, inputs, broken, torch.tensor([1]))
    naive = workload(op).naive(spec, inputs)()
    ref = paged.paged_indexer_reference(*inputs)
    assert torch.equal(torch.isinf(naive.cpu()), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(naive.cpu()[fin].double(), ref[fin], rtol=2e-2, atol=2e-2 * ref[fin].abs().max().item())
    assert workload(op).shape_info(spec, 3, 50)["next_n"] == 2
    flops, nbytes = op.cost(spec).evaluate(workload(op).sizes(128, 32768))
    assert flops == pytest.approx(2 * 128 * 2 * (32768 - 0.5) * 16 * 128)
    assert nbytes > 128 * 32768 * 132
