"""FlashMLA's DeepSeek-V4 interface in `dsagen.compat.flash_mla`: attention sinks, the second
(window) cache, per-request top-k lengths, the MODEL1 cache (584 B/token, d_qk 512) beside
V3.2's (656 B/token, d_qk 576), page sizes that are no power of two, FlashMLASchedMeta's rules,
and `flash_mla_sparse_fwd`'s attn_sink.

Every result is compared in full with float64 attention written here from the definition (the
cache rows decoded by the format's float64 codec): one softmax over the valid slots of both
selections (a slot < 0 or >= blocks * page_size, or past its request's top-k length, is left
out), out = softmax @ V with V the first 512 values of a row, then out *= 1 / (1 + exp(sink -
lse)), lse unchanged; a query without a valid slot gives out 0 and lse +inf. Cache rows that no
valid slot selects are NaN, so reading one shows. Shapes are tiny: the Triton interpreter runs
them on the CPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from dsagen.cache_formats import MLA_FORMATS, block_regions, dequantize_mla_pages, quantize_mla_pages
from dsagen.compat import flash_mla
from dsagen.verify import assert_close

V32, MODEL1 = MLA_FORMATS["deepseek_v32_fp8"], MLA_FORMATS["deepseek_v4_fp8"]
FORMATS = {"v32": V32, "model1": MODEL1}
D_V = 512
INVALID = (-(2**31), -1, None, 2**31 - 1)  # None: the cache's slot count
SINKS = (-math.inf, math.inf, 2.0, 3.5)  # one per head, h_q 4


def d_qk(fmt) -> int:
    return fmt.latent_dim + fmt.rope_dim


def padded(t: torch.Tensor) -> torch.Tensor:
    """t as a view into a larger tensor (every dimension padded, the last by 16), as FlashMLA's
    tests pass their inputs."""
    big = torch.zeros([n + 16 if i == t.dim() - 1 else n + 1 for i, n in enumerate(t.shape)], dtype=t.dtype)
    view = big[tuple(slice(0, n) for n in t.shape)]
    view.copy_(t)
    return view


def make_slots(gen, b: int, s_q: int, k: int, n_slots: int, all_invalid=()) -> torch.Tensor:
    """[b, s_q, k] int32: valid slots mixed with every kind of invalid one; the (request, token)
    pairs in all_invalid hold invalid slots only."""
    bad = torch.tensor([n_slots if x is None else x for x in INVALID], dtype=torch.int64)
    slots = torch.randint(0, max(n_slots, 1), (b, s_q, k), generator=gen)
    invalid = torch.rand(b, s_q, k, generator=gen) < 0.3
    for pair in all_invalid:
        invalid[pair] = True
    pick = bad[torch.randint(0, len(bad), (b, s_q, k), generator=gen)]
    return torch.where(invalid | (n_slots == 0), pick, slots).int()


def counted(slots: torch.Tensor, lengths: torch.Tensor | None, n_slots: int) -> torch.Tensor:
    """[b, s_q, k] bool: the slots attended to (valid and within the request's length)."""
    keep = (slots >= 0) & (slots < n_slots)
    if lengths is not None:
        keep &= torch.arange(slots.shape[-1])[None, None, :] < lengths.long()[:, None, None]
    return keep


def make_cache(gen, fmt, n_blocks: int, page: int, used: torch.Tensor):
    """(cache [n_blocks, page, 1, bytes_per_token] uint8, its rows float64 [n_blocks * page, d_qk]):
    random rows where `used` [n_blocks * page] holds, NaN elsewhere. A V3.2 cache gets a padded
    block stride (one spare token row per block); a MODEL1 cache has its own 576-byte padding."""
    rows = torch.randn(n_blocks * page, d_qk(fmt), generator=gen)
    rows[~used] = math.nan
    if fmt is V32:  # token rows, so quantized one token per page and laid out here
        cache = torch.zeros(n_blocks, page + 1, 1, fmt.bytes_per_token, dtype=torch.uint8)[:, :page]
        cache.copy_(quantize_mla_pages(rows.bfloat16(), fmt, 1).reshape(cache.shape))
    else:
        cache = quantize_mla_pages(rows.bfloat16(), fmt, page)
    return cache, dequantize_mla_pages(cache, fmt)


class Selection:
    """One cache, the slots each query token selects in it and the per-request lengths."""

    def __init__(self, gen, fmt, b, s_q, k, n_blocks, page, lengths=None, all_invalid=()):
        n_slots = n_blocks * page
        self.slots = make_slots(gen, b, s_q, k, n_slots, all_invalid)
        self.lengths = None if lengths is None else torch.tensor(lengths, dtype=torch.int32)
        self.keep = counted(self.slots, self.lengths, n_slots)
        used = torch.zeros(n_slots, dtype=torch.bool)
        used[self.slots[self.keep].long()] = True
        self.cache, self.rows = make_cache(gen, fmt, n_blocks, page, used)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [b, s_q, k, d] float64, zero where not counted; counted [b, s_q, k])."""
        at = self.slots.long().clamp(0, max(self.rows.shape[0] - 1, 0))
        rows = self.rows[at] if self.rows.shape[0] else torch.zeros(*at.shape, self.rows.shape[1], dtype=torch.float64)
        return torch.where(self.keep[..., None], rows, 0.0), self.keep


def reference_attention(q: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor, sm_scale: float, sink=None):
    """float64 (out [..., h, 512], lse [..., h]): q [..., h, d], rows [..., k, d], keep [..., k]."""
    scores = sm_scale * torch.einsum("...hd,...kd->...hk", q.double(), rows)
    scores = scores.masked_fill(~keep[..., None, :], -math.inf)
    lse = torch.logsumexp(scores, -1)
    some = keep.any(-1)[..., None]  # [..., 1]
    weights = torch.where(some[..., None], torch.exp(scores - torch.where(some, lse, 0.0)[..., None]), 0.0)
    out = weights @ rows[..., :D_V]
    if sink is not None:
        out = out / (1 + torch.exp(sink.double() - lse))[..., None]
    out = torch.where(some[..., None], out, 0.0)
    return out, torch.where(some, lse, math.inf)


def reference_decode(q, selections, sm_scale, sink=None):
    """float64 (out [b, s_q, h, 512], lse [b, h, s_q]) over every selection in one softmax."""
    parts = [s.gathered() for s in selections]
    rows = torch.cat([r for r, _ in parts], dim=2)
    keep = torch.cat([k for _, k in parts], dim=2)
    out, lse = reference_attention(q, rows, keep, sm_scale, sink)
    return out, lse.transpose(1, 2)


def decode(q, main, window=None, sink=None, sm_scale=0.07, meta=None, device="cpu"):
    """flash_mla_with_kvcache with FlashMLA's 16 positional arguments, inputs strided as its tests
    pass them."""
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    meta = meta if meta is not None else flash_mla.get_mla_metadata()[0]
    return flash_mla.flash_mla_with_kvcache(
        dev(padded(q)), dev(main.cache), None, None, D_V, meta, None, sm_scale, False, True,
        dev(padded(main.slots)), dev(sink), dev(window.cache) if window else None,
        dev(padded(window.slots)) if window else None, dev(main.lengths), dev(window.lengths) if window else None)


def check(got, want, exact_zero_heads=()) -> None:
    """out and lse in full against the reference: NaN fails, infinities where the reference has
    them; heads whose sink is +inf are exactly 0."""
    out, lse = got
    ref_out, ref_lse = want
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_close("sparse_decode.out", out, ref_out)
    assert_close("sparse_decode.lse", lse, ref_lse)
    for h in exact_zero_heads:
        assert torch.all(out[:, :, h].cpu() == 0), "a sink of +inf zeroes the head's output"


# ------------------------------------------------------------------------------------------------
# flash_mla_with_kvcache

CASES = [  # format, main page size, window page size (None: no window)
    ("v32", 53, 61), ("v32", 1, None), ("model1", 61, 1), ("model1", 53, None), ("model1", 1, 53),
]


@pytest.mark.parametrize("name,page,window_page", CASES, ids=[f"{f}-p{p}-w{w}" for f, p, w in CASES])
def test_sinks_windows_lengths_and_odd_pages(device, gen, name, page, window_page):
    """Main and window selections with per-request lengths (0, negative, short, past the width),
    sinks of -inf, +inf and finite values, every kind of invalid slot, an all-invalid token."""
    fmt, b, s_q, h = FORMATS[name], 3, 2, 4
    q = torch.randn(b, s_q, h, d_qk(fmt), generator=gen).bfloat16()
    main = Selection(gen, fmt, b, s_q, 9, 2, page, lengths=[9, 4, 0], all_invalid=[(0, 1)])
    window = None
    if window_page is not None:
        window = Selection(gen, fmt, b, s_q, 6, 3, window_page, lengths=[-2, 6, 11])
    sink = torch.tensor(SINKS)
    selections = [main] + ([window] if window else [])
    got = decode(q, main, window, sink, device=device)
    check(got, reference_decode(q, selections, 0.07, sink), exact_zero_heads=[1])
    plain = decode(q, main, window, device=device)  # no sink
    check(plain, reference_decode(q, selections, 0.07))
    if window is None:  # token (0, 1) and request 2 select nothing
        assert torch.all(plain[0][0, 1] == 0) and torch.all(plain[0][2] == 0)
        assert torch.all(torch.isposinf(plain[1][0, :, 1])) and torch.all(torch.isposinf(plain[1][2]))


@pytest.mark.parametrize("name", ["v32", "model1"])
def test_window_without_a_main_selection(device, gen, name):
    """Only the window attends: main slots all invalid, lengths of 0, or no main column at all."""
    fmt, b, s_q, h = FORMATS[name], 2, 2, 4
    q = torch.randn(b, s_q, h, d_qk(fmt), generator=gen).bfloat16()
    window = Selection(gen, fmt, b, s_q, 5, 2, 3, lengths=[5, 2])
    sink = torch.tensor(SINKS)
    want = reference_decode(q, [window], 0.07, sink)
    nothing = Selection(gen, fmt, b, s_q, 4, 3, 4, all_invalid=[(i, t) for i in range(b) for t in range(s_q)])
    lengths_0 = Selection(gen, fmt, b, s_q, 4, 3, 4, lengths=[0, 0])
    no_column = Selection(gen, fmt, b, s_q, 0, 3, 4)
    for main in (nothing, lengths_0, no_column):
        check(decode(q, main, window, sink, device=device), want, exact_zero_heads=[1])


@pytest.mark.parametrize("name", ["v32", "model1"])
def test_empty_windows(device, gen, name):
    """A window of no column, or of lengths 0, adds nothing; with no main column either, every
    query gets out 0 and lse +inf (nothing runs)."""
    fmt, b, s_q, h = FORMATS[name], 2, 1, 4
    q = torch.randn(b, s_q, h, d_qk(fmt), generator=gen).bfloat16()
    main = Selection(gen, fmt, b, s_q, 7, 2, 5)
    sink = torch.tensor(SINKS)
    want = reference_decode(q, [main], 0.07, sink)
    for window in (Selection(gen, fmt, b, s_q, 0, 2, 3), Selection(gen, fmt, b, s_q, 4, 2, 3, lengths=[0, -1])):
        check(decode(q, main, window, sink, device=device), want, exact_zero_heads=[1])
    empty = Selection(gen, fmt, b, s_q, 0, 2, 5)
    out, lse = decode(q, empty, Selection(gen, fmt, b, s_q, 0, 2, 3), sink, device=device)
    assert out.shape == (b, s_q, h, D_V) and torch.all(out == 0)
    assert lse.shape == (b, h, s_q) and torch.all(torch.isposinf(lse))


@pytest.mark.parametrize("name", ["v32", "model1"])
def test_nan_in_a_window_row_reaches_only_its_queries(device, gen, name):
    """A NaN fp8 code in a window row that only token (0, 0) selects makes that token's out and
    lse NaN on every head (with a sink too) and nothing else."""
    fmt, b, s_q, h = FORMATS[name], 2, 1, 4
    q = torch.randn(b, s_q, h, d_qk(fmt), generator=gen).bfloat16()
    main = Selection(gen, fmt, b, s_q, 4, 2, 3)
    window = Selection(gen, fmt, b, s_q, 3, 2, 5)
    window.slots[0, 0] = torch.tensor([0, 1, -1])
    window.slots[1, 0] = torch.tensor([2, 3, 9])
    window.keep = counted(window.slots, None, 10)
    window.cache, window.rows = make_cache(gen, fmt, 2, 5, torch.ones(10, dtype=torch.bool))
    if fmt is V32:
        window.cache[0, 1, 0, 5] = 0x7F  # slot 1: an fp8 NaN code in its latent part
    else:
        block_regions(window.cache, MODEL1)[0][0, 1, 5] = 0x7F
    window.rows = dequantize_mla_pages(window.cache, fmt)
    sink = torch.tensor(SINKS)
    out, lse = decode(q, main, window, sink, device=device)
    ref_out, ref_lse = reference_decode(q, [main, window], 0.07, sink)
    assert torch.isnan(ref_lse[0]).all() and not torch.isnan(ref_lse[1]).any()
    assert torch.isnan(lse[0].cpu()).all() and torch.isnan(out[0].cpu()).all()
    check((out[1:], lse[1:]), (ref_out[1:], ref_lse[1:]), exact_zero_heads=[1])


def test_flashmla_schedule_metadata_rules(device, gen):
    """The first call records FlashMLA's Config; a reuse with the same shapes runs, one with another
    window top-k or page size is refused; get_mla_metadata takes the old arguments."""
    fmt, b, s_q, h = MODEL1, 2, 1, 4
    meta, splits = flash_mla.get_mla_metadata(torch.ones(2, dtype=torch.int32), 64, 1, num_heads_k=1)
    assert splits is None and not meta.have_initialized and meta.config is None
    q = torch.randn(b, s_q, h, 512, generator=gen).bfloat16()
    main, window = Selection(gen, fmt, b, s_q, 3, 2, 5), Selection(gen, fmt, b, s_q, 2, 2, 3)
    decode(q, main, window, meta=meta, device=device)
    assert meta.have_initialized and meta.tile_scheduler_metadata is None and meta.num_splits is None
    assert meta.config == flash_mla.FlashMLASchedMeta.Config(b, s_q, h, 5, 1, False, True, 3, 3, 2)
    check(decode(q, main, window, meta=meta, device=device), reference_decode(q, [main, window], 0.07))
    for other in (Selection(gen, fmt, b, s_q, 4, 2, 3), Selection(gen, fmt, b, s_q, 2, 2, 6)):
        with pytest.raises(ValueError, match=r"^flash_mla_with_kvcache: tile_scheduler_metadata was made for "
                                             r"extra_\w+=\d+; this call has .*use one metadata object per shape$"):
            decode(q, main, other, meta=meta, device=device)


# ------------------------------------------------------------------------------------------------
# flash_mla_sparse_fwd's attn_sink

@pytest.mark.parametrize("qk", [576, 512])
def test_prefill_attn_sink(device, backend, gen, qk):
    """out scaled by 1 / (1 + exp(sink - lse)), -inf and +inf included; max_logits and lse as
    without a sink; topk_length and an all-invalid query."""
    s_q, h, s_kv, topk = 3, 4, 40, 12
    q = torch.randn(s_q, h, qk, generator=gen).bfloat16()
    kv = torch.randn(s_kv, 1, qk, generator=gen).bfloat16()
    idx = make_slots(gen, 1, s_q, topk, s_kv, all_invalid=[(0, 2)])[0]
    lengths = torch.tensor([12, 5, 12], dtype=torch.int32)
    sink = torch.tensor(SINKS)
    out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(
        q.to(device), kv.to(device), idx[:, None].to(device), 0.06, 512, sink.to(device), lengths.to(device),
        backend=backend)
    keep = (idx >= 0) & (idx < s_kv) & (torch.arange(topk)[None, :] < lengths[:, None])
    rows = torch.where(keep[..., None], kv[idx.long().clamp(0, s_kv - 1), 0].double(), 0.0)
    ref_out, ref_lse = reference_attention(q, rows, keep, 0.06, sink)
    assert_close("sparse_attention.out", out, ref_out)
    assert_close("sparse_attention.lse", lse, ref_lse)
    scores = (0.06 * torch.einsum("thd,tkd->thk", q.double(), rows)).masked_fill(~keep[:, None], -math.inf)
    assert_close("sparse_attention.lse", max_logits, scores.amax(-1))
    assert torch.all(out[:, 1].cpu() == 0) and torch.all(out[2].cpu() == 0)
    assert torch.all(torch.isposinf(lse[2].cpu())) and torch.all(torch.isneginf(max_logits[2].cpu()))


# ------------------------------------------------------------------------------------------------
# refused arguments

def refused_args(dev) -> dict:
    """A MODEL1 call (b 2, s_q 1, h_q 4, pages of 5) that runs; each case breaks one argument."""
    cache = quantize_mla_pages(torch.zeros(10, 512).bfloat16(), MODEL1, 5).to(dev)
    return dict(q=torch.zeros(2, 1, 4, 512, dtype=torch.bfloat16, device=dev), k_cache=cache, block_table=None,
                cache_seqlens=None, head_dim_v=512, tile_scheduler_metadata=flash_mla.get_mla_metadata()[0],
                softmax_scale=None, is_fp8_kvcache=True, indices=torch.zeros(2, 1, 3, dtype=torch.int32, device=dev),
                extra_k_cache=cache, extra_indices_in_kvcache=torch.zeros(2, 1, 2, dtype=torch.int32, device=dev))


REFUSED = {
    "extra_k_cache-alone": (lambda a, d: {"extra_indices_in_kvcache": None}, ValueError,
                            "extra_k_cache and extra_indices_in_kvcache go together"),
    "extra_topk_length-without-window": (
        lambda a, d: {"extra_k_cache": None, "extra_indices_in_kvcache": None,
                      "extra_topk_length": torch.zeros(2, dtype=torch.int32, device=d)},
        ValueError, "extra_topk_length needs extra_k_cache"),
    "extra_k_cache-other-format": (
        lambda a, d: {"extra_k_cache": torch.zeros(2, 5, 1, 656, dtype=torch.uint8, device=d)}, ValueError,
        "extra_k_cache must have shape [*, *, 1, 584]"),
    "k_cache-pages-of-0": (lambda a, d: {"k_cache": a["k_cache"][:, :0]}, ValueError,
                           "page_size (k_cache.shape[1]) must be >= 1"),
    "k_cache-unpacked": (lambda a, d: {"k_cache": torch.zeros(2, 5, 1, 600, dtype=torch.uint8, device=d)[..., :584]},
                         ValueError, "k_cache must hold each block's 5 x 584 bytes packed"),
    "q-576-with-model1": (lambda a, d: {"q": torch.zeros(2, 1, 4, 576, dtype=torch.bfloat16, device=d)}, ValueError,
                          "q.shape[-1] (d_qk) must be 512 with DeepSeek-V4's MODEL1 cache"),
    "attn_sink-fp16": (lambda a, d: {"attn_sink": torch.zeros(4, dtype=torch.float16, device=d)}, ValueError,
                       "attn_sink must have dtype torch.float32"),
    "attn_sink-per-token": (lambda a, d: {"attn_sink": torch.zeros(2, 4, device=d)}, ValueError,
                            "attn_sink must have shape [4]"),
    "topk_length-per-token": (lambda a, d: {"topk_length": torch.zeros(2, 1, dtype=torch.int32, device=d)},
                              ValueError, "topk_length must have shape [2]"),
    "extra_indices-int64": (lambda a, d: {"extra_indices_in_kvcache": a["extra_indices_in_kvcache"].long()},
                            ValueError, "extra_indices_in_kvcache must have dtype torch.int32"),
    "head_dim_v-448": (lambda a, d: {"head_dim_v": 448}, ValueError, "head_dim_v=448: must be 512"),
}


@pytest.mark.parametrize("what", list(REFUSED))
def test_refused_arguments_are_named(device, what):
    change, error, says = REFUSED[what]
    args = refused_args(device)
    args |= change(args, device)
    with pytest.raises(Exception) as info:
        flash_mla.flash_mla_with_kvcache(**args)
    message = str(info.value)
    assert type(info.value) is error and message.startswith("flash_mla_with_kvcache: ") and "\n" not in message
    assert says in message, message


def test_the_refused_base_call_runs(device):
    """The base call of the refusals is valid: zero rows, every slot 0, so out 0 and lse log(5)."""
    out, lse = flash_mla.flash_mla_with_kvcache(**refused_args(device))
    assert torch.all(out == 0) and torch.allclose(lse.cpu(), torch.full((2, 4, 1), math.log(5.0)))


def test_bf16_default_dtype(device, gen):
    """FlashMLA's tests set torch's default dtype to bf16: lse and max_logits stay fp32 on every
    path (no valid slot, a sink, the prefill without a valid index)."""
    q = torch.randn(2, 1, 4, 512, generator=gen).bfloat16()
    sink = torch.tensor(SINKS)
    main = Selection(gen, MODEL1, 2, 1, 3, 2, 5, all_invalid=[(0, 0)])
    empty = Selection(gen, MODEL1, 2, 1, 0, 2, 5)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        results = [decode(q, empty, sink=sink, device=device), decode(q, main, sink=sink, device=device)]
        prefill = flash_mla.flash_mla_sparse_fwd(q[:, 0].to(device), torch.zeros(0, 1, 512, dtype=torch.bfloat16,
                                                 device=device), torch.zeros(2, 1, 3, dtype=torch.int32,
                                                 device=device), 0.1, attn_sink=sink.to(device))
    finally:
        torch.set_default_dtype(previous)
    assert [lse.dtype for _, lse in results] == [torch.float32] * 2
    assert prefill[1].dtype == prefill[2].dtype == torch.float32
    check(results[1], reference_decode(q, [main], 0.07, sink), exact_zero_heads=[1])
