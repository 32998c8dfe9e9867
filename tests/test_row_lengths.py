"""Visible lengths per query row: context_lens [B, next_n] (row b * next_n + j sees the positions
< context_lens[b, j], DeepGEMM's per-token lengths) through the paged indexer and the decode top-k,
on both backends, against the float64 / canonical references: lengths in any order, zero, negative,
past the table, strided; [B] lengths still mean len - next_n + j + 1; bad shapes named."""
from __future__ import annotations

import math

import pytest
import torch

import dsagen
import dsagen.ops.decode_topk_workload as dt
import dsagen.ops.paged_indexer_workload as paged

import test_decode_topk as topk_tests
import test_paged_indexer as indexer_tests


def per_row_lens(gen, n_req: int, next_n: int, longest: int) -> torch.Tensor:
    """int32 [B, next_n] lengths in random order, with 0, a negative one and one past `longest`."""
    lens = torch.randint(1, longest + 1, (n_req, next_n), generator=gen, dtype=torch.int32)
    lens.view(-1)[:3] = torch.tensor([0, -5, longest + 40], dtype=torch.int32)[:lens.numel()]
    return lens


@pytest.mark.parametrize("page,next_n", [(16, 3), (53, 2)])
def test_paged_indexer_with_lengths_per_row(device, backend, gen, page, next_n):
    spec = indexer_tests.make_spec(3, 40, page)
    kernels = dsagen.build(spec, backend=backend)
    # whole pages (make_case poisons a partial last page's tail); past them the table names no page
    q, cache, weights, lens, table = indexer_tests.make_case(gen, spec, [3 * page, page, 2 * page], next_n)
    rows = per_row_lens(gen, 3, next_n, table.shape[1] * page)
    case = (q, cache, weights, rows, table)
    got, ref = indexer_tests.run_and_check(kernels, spec, case, device)
    cols = torch.arange(got.shape[1])
    assert torch.equal(torch.isfinite(got.cpu()), torch.isfinite(ref) & (cols[None, :] < rows.reshape(-1, 1)))


def test_paged_indexer_per_row_lengths_equal_the_per_request_rule(device, backend, gen):
    """[B, next_n] lengths len - next_n + j + 1 give the [B] call's logits, bit for bit; a strided
    [B, next_n] view reads the same."""
    spec = indexer_tests.make_spec(3, 40, 3)
    kernels = dsagen.build(spec, backend=backend)
    q, cache, weights, lens, table = (t.to(device) for t in indexer_tests.make_case(gen, spec, [20, 9, 1], 2))
    want = kernels.paged_indexer(q, cache, weights, lens, table)
    rows = lens[:, None] - 2 + 1 + torch.arange(2, device=device, dtype=torch.int32)
    strided = torch.zeros(3, 5, dtype=torch.int32, device=device)[:, ::2]
    strided[:, :2] = rows
    assert torch.equal(kernels.paged_indexer(q, cache, weights, strided[:, :2], table), want)
    assert torch.equal(kernels.paged_indexer(q, cache, weights, rows.contiguous(), table), want)


def topk_case(gen, lens_rows: torch.Tensor, page: int, max_blocks: int):
    """logits [B * next_n, max_blocks * page] N(0, 1) inside each row's window, NaN past it, and a
    shuffled table with invalid entries past each request's longest window."""
    n_req, next_n = lens_rows.shape
    longest = lens_rows.clamp_min(0).amax(1).tolist()
    logits, _, table = topk_tests.make_case(gen, [min(n, max_blocks * page) for n in longest], 1, page, max_blocks)
    logits = torch.randn(n_req * next_n, max_blocks * page, generator=gen)
    visible = dt.visible_lengths(lens_rows, next_n, logits.shape[1])
    logits[torch.arange(logits.shape[1])[None, :] >= visible[:, None]] = math.nan
    return logits, lens_rows, table


@pytest.mark.parametrize("page", [16, 61])
def test_decode_topk_with_lengths_per_row(device, backend, gen, page):
    spec = topk_tests.make_spec(16, page)
    kernels = topk_tests.build(spec, backend, **topk_tests.small(backend, sorted=1))
    rows = per_row_lens(gen, 3, 3, 4 * page)
    got = topk_tests.run_and_check(kernels, topk_case(gen, rows, page, 4), device, sorted_out=True)
    assert (got.reshape(9, 16)[0] == -1).all() and (got.reshape(9, 16)[1] == -1).all()  # lengths 0 and -5


def test_decode_topk_per_row_lengths_equal_the_per_request_rule(device, backend, gen):
    spec = topk_tests.make_spec(16, 3)
    kernels = topk_tests.build(spec, backend, **topk_tests.small(backend, sorted=1))
    logits, lens, table = (t.to(device) for t in topk_tests.make_case(gen, [40, 17, 2], 2, 3))
    rows = lens[:, None] - 2 + 1 + torch.arange(2, device=device, dtype=torch.int32)
    assert torch.equal(kernels.decode_topk(logits, rows, table), kernels.decode_topk(logits, lens, table))


def test_bad_lengths_are_named(device):
    spec = dsagen.Spec(indexer=dsagen.IndexerSpec(heads=3, head_dim=40), topk=dsagen.TopKSpec(k=16),
                       cache=dsagen.CacheSpec(page_size=3))
    kernels = dsagen.build(spec)
    q, cache, weights, lens, table = (t.to(device) for t in indexer_tests.make_case(
        torch.Generator().manual_seed(0), spec, [9, 4], 2))
    with pytest.raises(ValueError, match=r"context_lens must have shape \[2, 2\], got \[2, 3\]"):
        kernels.paged_indexer(q, cache, weights, torch.zeros(2, 3, dtype=torch.int32, device=device), table)
    with pytest.raises(ValueError, match=r"context_lens must have shape \[B\] or \[B, next_n\]"):
        kernels.paged_indexer(q, cache, weights, torch.zeros(2, 2, 1, dtype=torch.int32, device=device), table)
    logits = torch.zeros(4, 12, device=device)
    with pytest.raises(ValueError, match=r"context_lens must have shape \[2, 2\], got \[2, 1\]"):
        kernels.decode_topk(logits, torch.zeros(2, 1, dtype=torch.int32, device=device), table)
    with pytest.raises(ValueError, match="context_lens must have dtype torch.int32"):
        kernels.decode_topk(logits, torch.zeros(2, 2, dtype=torch.int64, device=device), table)
