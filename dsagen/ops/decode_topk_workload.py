"""The decode top-k's workload: B requests of SKV tokens, next_n = 2 query rows, pages shuffled
across requests, random logits with -inf past each row's window (as the paged indexer writes
them); checked exactly (the canonical slots) on sampled requests."""
from __future__ import annotations

import math

import torch

from ..decode import decode_windows, page_slots, positions_to_slots
from ..verify import Mismatch
from .decode_topk import request_rows
from .shared import WORKLOAD_NEXT_N
from .workload import Workload, few_keys_warning, generator


def row_ends(context_lens: torch.Tensor, next_n: int) -> torch.Tensor:
    """int64 [B * next_n]: row b * next_n + j sees the positions < this (>= 0, before any clamp to the
    columns): max(len, 0) - next_n + j + 1 for lengths per request [B], lens[b, j] for lengths per
    row [B, next_n]."""
    lens = context_lens.long()
    if lens.dim() == 2:
        return lens.reshape(-1).clamp_min(0)
    j = torch.arange(next_n, device=lens.device)
    return (lens.clamp_min(0)[:, None] - next_n + 1 + j[None, :]).reshape(-1).clamp_min(0)


def visible_lengths(context_lens: torch.Tensor, next_n: int, n_cols: int) -> torch.Tensor:
    """int64 [B * next_n]: the positions row b * next_n + j sees, clamp(len - next_n + j + 1, 0, n_cols)
    (clamp(lens[b, j], 0, n_cols) for lengths per row)."""
    return row_ends(context_lens, next_n).clamp_max(n_cols)


def top_positions(window: torch.Tensor, k: int) -> torch.Tensor:
    """The positions (ascending) of the k largest of one window's fp32 values: NaN above
    everything, NaNs tied with each other and -0 with +0, ties to the lower position. Exact
    comparisons of the fp32 values (no float64 needed)."""
    nan = torch.isnan(window)
    plain = torch.where(nan, torch.zeros_like(window), window) + 0.0  # + 0.0 turns -0 into +0
    order = torch.sort(plain, descending=True, stable=True).indices  # ties keep position order
    order = order[torch.sort(nan[order].to(torch.int8), descending=True, stable=True).indices]  # NaN first
    return torch.sort(order[:k]).values


def window_width(logits: torch.Tensor, block_table: torch.Tensor, page_size: int) -> int:
    """The positions a row can see at most: the logits' columns, and only those the block table
    holds pages for (a position past the table has no slot)."""
    return min(logits.shape[1], block_table.shape[1] * page_size)


def canonical_positions(logits, context_lens, block_table, k: int, page_size: int) -> list[torch.Tensor]:
    """Per row, the positions the kernel selects, ascending (top_positions of its visible window)."""
    next_n = request_rows(logits, context_lens)
    x = logits.detach().cpu()
    visible = visible_lengths(context_lens.cpu(), next_n, window_width(x, block_table, page_size))
    return [top_positions(x[r, :int(visible[r])], k) for r in range(x.shape[0])]


def decode_topk_reference(logits, context_lens, block_table, k: int, page_size: int) -> torch.Tensor:
    """slots [B, next_n, k] int32 (CPU): the canonical answer, by ascending position, -1 padded
    (and -1 for a position whose table entry gives no slot)."""
    next_n = request_rows(logits, context_lens)
    n_req = context_lens.shape[0]
    table = block_table.cpu()
    pos = torch.full((n_req * next_n, k), -1, dtype=torch.int64)
    for r, chosen in enumerate(canonical_positions(logits, context_lens, table, k, page_size)):
        pos[r, :chosen.numel()] = chosen
    return positions_to_slots(pos, table, page_size, next_n)


def slots_of_window(table_row: torch.Tensor, visible: int, page_size: int) -> torch.Tensor:
    """int64 [visible]: the slot of each visible position of one request (visible <= the table's
    positions), -1 where its entry gives none (negative, or a slot past int32)."""
    pos = torch.arange(visible)
    return page_slots(table_row[pos // page_size], pos % page_size, page_size)


def slots_to_positions(slots: torch.Tensor, table_row: torch.Tensor, visible: int, page_size: int) -> torch.Tensor:
    """The visible position each slot of one request stands for (-1: none does)."""
    own = slots_of_window(table_row, visible, page_size)
    ordered, order = torch.sort(own)
    at = torch.searchsorted(ordered, slots.long()).clamp_max(visible - 1)
    return torch.where((ordered[at] == slots.long()) & (slots.long() >= 0), order[at], -1)


def assert_decode_topk(slots, logits, context_lens, block_table, k: int, page_size: int, rows=None) -> None:
    """The exact contract on rows `rows` (default all): per row, the first min(k, visible) slots map
    back to distinct visible positions whose logits are the k largest of the window (NaN first: the
    NaN count must match; the other values equal exactly), those positions are the canonical ones
    (ties to the lower position), and every remaining slot is -1 (all slots -1 for a table of no
    pages). The window stops at the table's last position. Where the window's slots are not one per
    position (entries that give no slot, -1, or pages named twice), the slots must equal the
    canonical positions' slots."""
    next_n = request_rows(logits, context_lens)
    n_req = context_lens.shape[0]
    got = slots.detach().cpu()
    if tuple(got.shape) != (n_req, next_n, k) or got.dtype != torch.int32:
        raise Mismatch(f"decode_topk: {got.dtype} {tuple(got.shape)}, want torch.int32 {(n_req, next_n, k)}")
    got = got.reshape(n_req * next_n, k)
    x = logits.detach().cpu()
    table = block_table.detach().cpu()
    visible = visible_lengths(context_lens.cpu(), next_n, window_width(x, table, page_size))
    for r in (range(got.shape[0]) if rows is None else rows):
        r = int(r)
        b, vis = r // next_n, int(visible[r])
        n = min(k, vis)
        head, tail = got[r, :n], got[r, n:]
        if (tail != -1).any():
            raise Mismatch(f"decode_topk row {r}: slots {n}.. must be -1, got {tail[tail != -1][:5].tolist()}")
        if n == 0:
            continue
        want_pos = top_positions(x[r, :vis], k)
        own = slots_of_window(table[b], vis, page_size)
        if (own < 0).any() or torch.unique(own).numel() != vis:  # slots that name no single position
            if not torch.equal(torch.sort(head.long()).values, torch.sort(own[want_pos]).values):
                raise Mismatch(f"decode_topk row {r}: not the slots of the {n} largest of the window")
            continue
        pos = slots_to_positions(head, table[b], vis, page_size)
        if (pos < 0).any():
            raise Mismatch(f"decode_topk row {r}: slots that are no visible position's: {head[pos < 0][:5].tolist()}")
        if torch.unique(pos).numel() != n:
            raise Mismatch(f"decode_topk row {r}: repeated positions")
        got_vals, want_vals = x[r, pos], x[r, want_pos]
        got_nan, want_nan = torch.isnan(got_vals), torch.isnan(want_vals)
        if int(got_nan.sum()) != int(want_nan.sum()):
            raise Mismatch(f"decode_topk row {r}: {int(got_nan.sum())} NaN selected, the window's top {n} hold "
                           f"{int(want_nan.sum())} (NaN ranks above +inf)")
        got_rest = torch.sort(got_vals[~got_nan], descending=True).values
        want_rest = torch.sort(want_vals[~want_nan], descending=True).values
        if not torch.equal(got_rest, want_rest):
            raise Mismatch(f"decode_topk row {r}: selected values are not the {n} largest of the window")
        if not torch.equal(torch.sort(pos).values, want_pos):
            raise Mismatch(f"decode_topk row {r}: the selected positions are not the lowest among tied values")


def naive_decode_topk(logits, context_lens, block_table, k: int, page_size: int):
    """torch: the windows masked to -inf, torch.topk over the rows, picks past the window made -1,
    then the page-table transform (dsagen.decode.positions_to_slots)."""
    next_n = request_rows(logits, context_lens)
    ke = row_ends(context_lens, next_n).clamp_max(window_width(logits, block_table, page_size))
    n_cols = logits.shape[1]
    cols = torch.arange(n_cols, device=logits.device)
    masked = logits.masked_fill(cols[None, :] >= ke[:, None], -math.inf)
    take = min(k, n_cols)
    pos = torch.topk(masked, take, dim=1).indices
    pos = torch.where(torch.arange(take, device=logits.device)[None, :] < ke[:, None], pos, -1)
    if take < k:
        pos = torch.cat([pos, pos.new_full((pos.shape[0], k - take), -1)], dim=1)
    return positions_to_slots(pos, block_table, page_size, next_n)


def decode_topk_inputs(spec, n_req: int, context: int, device, seed: int, next_n: int = WORKLOAD_NEXT_N):
    """B requests of `context` tokens, pages shuffled across requests (as paged_indexer_inputs), and
    logits [B * next_n, max_blocks * page_size]: N(0, 1) inside each row's window, -inf past it."""
    page_size = spec.cache.page_size
    g = generator(device, seed)
    max_blocks = -(-context // page_size)
    n_cols = max_blocks * page_size
    table = torch.randperm(n_req * max_blocks, device=device, generator=g).reshape(n_req, max_blocks).int()
    lens = torch.full((n_req,), context, dtype=torch.int32, device=device)
    logits = torch.randn(n_req * next_n, n_cols, device=device, generator=g)
    _, ke = decode_windows(lens, next_n)
    logits.masked_fill_(torch.arange(n_cols, device=device)[None, :] >= ke[:, None], -math.inf)
    return logits, lens, table


class DecodeTopKWorkload(Workload):
    kernel = "decode_topk"
    naive_name = "masked torch.topk + positions_to_slots"

    def reference(self, spec, logits, context_lens, block_table):
        """The canonical slots (ascending position, -1 padded): the k largest values of each window
        and, since ties go to the lower position, the one set of positions that holds them."""
        return decode_topk_reference(logits, context_lens, block_table, spec.topk.k, spec.cache.page_size)

    def inputs(self, spec, S_, SKV_, device, seed):
        return decode_topk_inputs(spec, S_, SKV_, device, seed)

    def poisoned_outputs(self, spec, inputs):
        logits, lens = inputs[0], inputs[1]
        next_n = request_rows(logits, lens)
        return {"out": torch.full((lens.shape[0], next_n, spec.topk.k), -7, dtype=torch.int32, device=logits.device)}

    def check(self, spec, inputs, result, rows):
        """rows: requests (the workload's S axis); each is checked on all its next_n rows."""
        logits, lens, table = inputs
        next_n = request_rows(logits, lens)
        b = rows.cpu().long()
        r = (b[:, None] * next_n + torch.arange(next_n)).reshape(-1)
        assert_decode_topk(result, logits, lens, table, spec.topk.k, spec.cache.page_size, rows=r.tolist())
        return f"exact top-k slots on {len(rows)} requests x {next_n} rows"

    def naive(self, spec, inputs):
        return lambda: naive_decode_topk(*inputs, spec.topk.k, spec.cache.page_size)

    def call_shape(self, S_, SKV_):
        return WORKLOAD_NEXT_N * S_, SKV_  # the workload's B requests x next_n = 2 query rows; each row's context

    def shape_info(self, spec, S_, SKV_):
        return {"S": S_, "SKV": SKV_, "B": S_, "next_n": WORKLOAD_NEXT_N, "context": SKV_, "k": spec.topk.k,
                "page_size": spec.cache.page_size}

    def sizes(self, S_, SKV_):
        return {"S": S_, "SKV": SKV_, "W": SKV_ - (WORKLOAD_NEXT_N - 1) / 2}

    def bench_warning(self, spec, S_, SKV_):
        return few_keys_warning(spec, SKV_)


WORKLOAD = DecodeTopKWorkload()
