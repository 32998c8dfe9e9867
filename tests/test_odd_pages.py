"""Page sizes that are no power of two (1, 3, 53, 61, 576 as DeepSeek-V4 engines use) through the
paged kernels, on both backends: key blocks straddling pages, blocks that hold whole pages and
pages that hold whole blocks, block tables with invalid entries, against the float64 references."""
from __future__ import annotations

import pytest
import torch

import dsagen
import dsagen.ops.mla_cache_write_workload as mcw
from dsagen.cache_formats import MAX_PAGE_SIZE, check_page_size

import test_decode_topk as topk_tests
import test_mla_cache_write as write_tests
import test_paged_indexer as indexer_tests

ODD_PAGES = [1, 3, 53, 61]
# Triton key blocks of 32 and 256: a 53 / 61 / 576 token page holds no whole number of them
INDEXER_SCHEDULES = {"triton": {"block_n": 32, "block_h": 4, "key_blocks": 2, "num_warps": 4, "num_stages": 1,
                                "key_rows": 1},
                     "tvm": {"cpu_block_n": 64, "cpu_vec": 16, "cpu_block_h": 2, "cuda_block_h": 2}}


def test_any_page_size_up_to_the_bound_is_allowed():
    for page in ODD_PAGES + [576, MAX_PAGE_SIZE]:
        assert check_page_size(page) is None
    for bad in (0, -3, MAX_PAGE_SIZE + 1, True, 53.0):
        assert check_page_size(bad) == (f"must be an int from 1 to {MAX_PAGE_SIZE} (the kernels address a "
                                        "page's bytes with int32 offsets)")
    assert dsagen.Spec(cache=dsagen.CacheSpec(page_size=53)).cache.page_size == 53


@pytest.mark.parametrize("page", ODD_PAGES)
def test_paged_indexer_at_odd_pages(device, backend, gen, page):
    spec = indexer_tests.make_spec(3, 40, page)
    kernels = dsagen.build(spec, backend=backend, schedules={"paged_indexer": INDEXER_SCHEDULES[backend]})
    lens = [2 * page + 7, page, 1, 0] if page > 3 else [70, 37, 4, 0]
    indexer_tests.run_and_check(kernels, spec, indexer_tests.make_case(gen, spec, lens, next_n=2, spare_pages=2),
                                device)


@pytest.mark.parametrize("block_n", [64, 256])
def test_paged_indexer_at_576_token_pages(device, gen, block_n):
    """576 = 9 x 64: blocks of 64 read one table entry each, blocks of 256 straddle pages."""
    spec = indexer_tests.make_spec(2, 32, 576)
    schedule = {"block_n": block_n, "block_h": 2, "key_blocks": 1, "num_warps": 4, "num_stages": 1, "key_rows": 0}
    kernels = dsagen.build(spec, backend="triton", schedules={"paged_indexer": schedule})
    indexer_tests.run_and_check(kernels, spec, indexer_tests.make_case(gen, spec, [1200, 580], next_n=1, spare_pages=1),
                                device)


def test_paged_indexer_at_576_token_pages_on_tvm(device, gen):
    pytest.importorskip("tvm")
    spec = indexer_tests.make_spec(2, 32, 576)
    kernels = dsagen.build(spec, backend="tvm", schedules={"paged_indexer": INDEXER_SCHEDULES["tvm"]})
    indexer_tests.run_and_check(kernels, spec, indexer_tests.make_case(gen, spec, [700, 3], next_n=2, spare_pages=1),
                                device)


@pytest.mark.parametrize("page", ODD_PAGES + [576])
def test_decode_topk_at_odd_pages(device, backend, gen, page):
    spec = topk_tests.make_spec(16, page)
    kernels = topk_tests.build(spec, backend, **topk_tests.small(backend, sorted=1))
    lens = [3 * page + 5, 40, 2] if page < 576 else [600, 40]
    topk_tests.run_and_check(kernels, topk_tests.make_case(gen, lens, 2, page), device, sorted_out=True)


@pytest.mark.parametrize("page,n_pages", [(1, 40), (3, 13), (53, 2), (61, 2), (576, 1)])
def test_mla_cache_write_at_odd_pages(device, backend, gen, page, n_pages):
    spec = write_tests.cache_spec(page)
    kernels = dsagen.build(spec, backend=backend)
    n = 24
    rows = write_tests.special_rows(gen, n)
    slots = write_tests.random_slots(gen, n, n_pages * page, torch.int32)
    cache = mcw.poison_pattern(n_pages, page, write_tests.BPT, "cpu")
    write_tests.assert_written(kernels, spec, rows.to(device), slots.to(device), cache.to(device))
