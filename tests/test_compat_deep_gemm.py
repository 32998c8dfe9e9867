"""dsagen.compat.deep_gemm's current DeepGEMM names (fp8_fp4_mqa_logits, fp8_fp4_paged_mqa_logits,
get_num_sms / set_num_sms) and what the older names gained with them (compressed logits, per-token
context lengths), against float64 logits written from the math at small odd shapes.

These entry points allocate their outputs (DeepGEMM's take no output buffer), so every element
returned is compared: inside each window with the reference, outside it -inf exactly; NaN never
passes (assert_close)."""
from __future__ import annotations

import math

import pytest
import torch

from dsagen.cache_formats import pack_index_pages, unpack_index_pages
from dsagen.compat import deep_gemm
from dsagen.verify import assert_close

FP8, BF16, I32 = torch.float8_e4m3fn, torch.bfloat16, torch.int32
FP32_LOGITS = "indexer.logits.fp8_e4m3"
BF16_ROUNDING = 2.0 ** -8  # bf16 keeps 8 significant bits: the RMS ratio of a rounding stays below this


def relu_keep_nan(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0, torch.zeros_like(x), x)


def window_logits_64(q, k, k_scale, weights, ks, ke) -> torch.Tensor:
    """[M, N] float64: k_scale[n] * sum_h w[m, h] relu(q[m, h] . k[n]) for ks[m] <= n < ke[m], else -inf."""
    scores = relu_keep_nan(torch.einsum("mhd,nd->mhn", q.cpu().double(), k.cpu().double()))
    logits = torch.einsum("mhn,mh->mn", scores, weights.cpu().double()) * k_scale.cpu().double()[None, :]
    cols = torch.arange(k.shape[0])[None, :]
    inside = (cols >= ks.cpu().long()[:, None]) & (cols < ke.cpu().long()[:, None])
    return logits.masked_fill(~inside, -math.inf)


def compressed_64(full: torch.Tensor, ks, ke, width: int) -> torch.Tensor:
    """DeepGEMM's compressed layout, row by row: out[m, :ke - ks] = full[m, ks:ke] (cut at width)."""
    out = torch.full((full.shape[0], width), -math.inf, dtype=torch.float64)
    for m, (lo, hi) in enumerate(zip(ks.tolist(), ke.tolist())):
        n = max(0, min(hi - lo, width))
        out[m, :n] = full[m, lo:lo + n]
    return out


def paged_logits_64(q, cache, weights, lens_2d, table, width: int) -> torch.Tensor:
    """[B * next_n, width] float64: row b * next_n + j sees the tokens s < lens_2d[b, j] (token s in
    page table[b, s // page] at slot s % page); -inf elsewhere."""
    B, next_n, H, D = q.shape
    page = cache.shape[1]
    keys, scales = unpack_index_pages(cache.cpu(), D)
    q64, w64 = q.cpu().double(), weights.cpu().double().reshape(B, next_n, H)
    out = torch.full((B * next_n, width), -math.inf, dtype=torch.float64)
    for b in range(B):
        for j in range(next_n):
            n = min(int(lens_2d[b, j]), width, table.shape[1] * page)
            if n <= 0:
                continue
            s = torch.arange(n)
            token = table.cpu().long()[b, s // page] * page + s % page
            scores = relu_keep_nan(torch.einsum("hd,sd->hs", q64[b, j], keys[token]))
            out[b * next_n + j, :n] = torch.einsum("hs,h->s", scores, w64[b, j]) * scales[token]
    return out


def prefill_case(gen, device, M=5, H=3, D=20, N=11):
    """Random fp8 q and keys, power-of-two key scales, windows inside [0, N) (one of them empty)."""
    q = (torch.randn(M, H, D, generator=gen) * 4).to(FP8)
    k = (torch.randn(N, D, generator=gen) * 4).to(FP8)
    k_scale = torch.exp2(torch.randint(-3, 3, (N,), generator=gen).float())
    weights = torch.randn(M, H, generator=gen)
    ks = torch.randint(0, N, (M,), generator=gen, dtype=I32)
    ke = torch.minimum(ks + torch.randint(0, N, (M,), generator=gen, dtype=I32), torch.tensor(N, dtype=I32))
    ke[1] = ks[1]  # an empty window
    return [t.to(device) for t in (q, k, k_scale, weights, ks, ke)]


@pytest.mark.parametrize("logits_dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_mqa_logits_are_the_math_in_either_dtype(device, gen, logits_dtype):
    q, k, k_scale, w, ks, ke = prefill_case(gen, device)
    got = deep_gemm.fp8_fp4_mqa_logits((q, None), (k, k_scale), w, ks, ke, logits_dtype=logits_dtype)
    assert got.dtype == logits_dtype and got.shape == (5, 11)
    want = window_logits_64(q, k, k_scale, w, ks, ke)
    assert_close(FP32_LOGITS, got, want, tol=BF16_ROUNDING if logits_dtype == BF16 else None)
    fp32 = deep_gemm.fp8_mqa_logits(q, (k, k_scale), w, ks, ke)  # the older name: fp32
    assert fp32.dtype == torch.float32
    assert torch.equal(got, fp32.to(logits_dtype))  # bf16 logits: the fp32 ones rounded


@pytest.mark.parametrize("width", [None, 2, 13], ids=["widest-window", "cuts-windows", "wider-than-keys"])
def test_compressed_logits_start_each_row_at_its_window(device, gen, width):
    q, k, k_scale, w, ks, ke = prefill_case(gen, device)
    width = width or int((ke - ks).max())
    want = compressed_64(window_logits_64(q, k, k_scale, w, ks, ke), ks.cpu(), ke.cpu(), width)
    got = deep_gemm.fp8_fp4_mqa_logits((q, None), (k, k_scale), w, ks, ke, clean_logits=False,
                                       max_seqlen_k=width)
    assert got.shape == (5, width)
    assert_close(FP32_LOGITS, got, want)
    older = deep_gemm.fp8_mqa_logits(q, (k, k_scale), w, ks, ke, True, width)
    assert torch.equal(older, got)
    bf16 = deep_gemm.fp8_fp4_mqa_logits((q, None), (k, k_scale), w.bfloat16(), ks, ke, max_seqlen_k=width,
                                        logits_dtype=BF16)
    assert torch.equal(bf16, deep_gemm.fp8_fp4_mqa_logits((q, None), (k, k_scale), w.bfloat16().float(), ks, ke,
                                                          max_seqlen_k=width, logits_dtype=BF16))


def paged_case(gen, device, B=3, next_n=3, H=3, D=20, page=4, max_blocks=3):
    """B requests over shuffled pages of `page` tokens (one table entry per page, some pages spare)."""
    n_pages = B * max_blocks + 2
    keys = (torch.randn(n_pages * page, D, generator=gen) * 6).to(FP8)
    scales = torch.exp2(torch.randint(-2, 3, (n_pages * page,), generator=gen).float())
    cache = pack_index_pages(keys, scales, page)
    table = torch.randperm(n_pages, generator=gen)[:B * max_blocks].reshape(B, max_blocks).to(I32)
    q = (torch.randn(B, next_n, H, D, generator=gen) * 4).to(FP8)
    weights = torch.randn(B * next_n, H, generator=gen)
    return [t.to(device) for t in (q, cache, weights, table)]


def lens_per_token(lens_1d: torch.Tensor, next_n: int) -> torch.Tensor:
    """The [B, next_n] lengths the [B] form means: query j sees s < len - next_n + j + 1."""
    return lens_1d.long()[:, None] - next_n + 1 + torch.arange(next_n)[None, :]


@pytest.mark.parametrize("logits_dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_paged_logits_with_a_length_per_request(device, gen, logits_dtype):
    """[B] lengths, next_n 3: a request of 0 tokens, one shorter than next_n, one filling its table."""
    q, cache, w, table = paged_case(gen, device)
    lens = torch.tensor([0, 2, 12], dtype=I32, device=device)
    meta = deep_gemm.get_paged_mqa_logits_metadata(lens, 4, deep_gemm.get_num_sms())
    got = deep_gemm.fp8_fp4_paged_mqa_logits((q, None), cache, w, lens, table, meta, 12, logits_dtype=logits_dtype)
    assert got.dtype == logits_dtype and got.shape == (9, 12)
    want = paged_logits_64(q, cache, w, lens_per_token(lens.cpu(), 3), table, 12)
    assert torch.isneginf(want[:3]).all() and torch.isneginf(want[3]).all()  # no visible token
    assert_close(FP32_LOGITS, got, want, tol=BF16_ROUNDING if logits_dtype == BF16 else None)
    older = deep_gemm.fp8_paged_mqa_logits(q, cache, w, lens, table, meta, 12)
    assert torch.equal(got, older.to(logits_dtype))


@pytest.mark.parametrize("max_context_len", [12, 7, 15], ids=["table-width", "crops", "pads"])
def test_paged_logits_with_a_length_per_query_token(device, gen, max_context_len):
    """[B, next_n] lengths in any order across a request's tokens, zeros and the whole table
    included: each row sees exactly its own length (the kernel's per-request rule would not)."""
    q, cache, w, table = paged_case(gen, device)
    lens = torch.tensor([[0, 5, 3], [12, 0, 12], [1, 11, 2]], dtype=I32)
    meta = deep_gemm.get_paged_mqa_logits_metadata(lens.to(device), block_kv=4, num_sms=deep_gemm.get_num_sms())
    got = deep_gemm.fp8_fp4_paged_mqa_logits((q, None), cache, w, lens.to(device), table, meta, max_context_len)
    want = paged_logits_64(q, cache, w, lens, table, max_context_len)
    assert_close(FP32_LOGITS, got, want)
    older = deep_gemm.fp8_paged_mqa_logits(q, cache, w, lens.to(device), table, meta, max_context_len, False)
    assert torch.equal(older, got)
    bf16 = deep_gemm.fp8_fp4_paged_mqa_logits((q, None), cache, w.bfloat16(), lens.to(device), table, meta,
                                              max_context_len, logits_dtype=BF16)
    # the weights were rounded to bf16 on the way in: the reference takes the same weights, so the
    # tolerance covers the output's own rounding only
    want_bf16_weights = paged_logits_64(q, cache, w.bfloat16(), lens, table, max_context_len)
    assert_close(FP32_LOGITS, bf16, want_bf16_weights, tol=BF16_ROUNDING)


def test_per_token_lengths_past_the_table_see_the_whole_table(device, gen):
    q, cache, w, table = paged_case(gen, device, B=1, next_n=2)
    lens = torch.tensor([[2**31 - 1, 40]], dtype=I32)
    meta = deep_gemm.get_paged_mqa_logits_metadata(lens.to(device), 4, 1)
    got = deep_gemm.fp8_fp4_paged_mqa_logits((q, None), cache, w, lens.to(device), table, meta, 12)
    assert_close(FP32_LOGITS, got, paged_logits_64(q, cache, w, lens, table, 12))
    assert torch.isfinite(got).all()


def test_num_sms_is_a_process_wide_setting():
    default = deep_gemm.get_num_sms()
    assert isinstance(default, int) and default >= 1
    try:
        deep_gemm.set_num_sms(1)
        assert deep_gemm.get_num_sms() == 1
        deep_gemm.set_num_sms(0)  # back to the device's count
        assert deep_gemm.get_num_sms() == default
        too_many = f"set_num_sms: num_sms must be from 0 .* to {default} .*got {default + 1}"
        with pytest.raises(ValueError, match=too_many):
            deep_gemm.set_num_sms(default + 1)
        with pytest.raises(ValueError, match="set_num_sms: num_sms must be a non-negative int, got -1"):
            deep_gemm.set_num_sms(-1)
        with pytest.raises(TypeError, match="set_num_sms: num_sms must be a non-negative int"):
            deep_gemm.set_num_sms(True)
        assert deep_gemm.get_num_sms() == default
    finally:
        deep_gemm.set_num_sms(0)


def test_metadata_takes_per_token_lengths_block_kv_and_indices(device):
    lens = torch.tensor([[3, 4], [7, 8]], dtype=I32, device=device)
    meta = deep_gemm.get_paged_mqa_logits_metadata(lens, block_kv=64, num_sms=5,
                                                   indices=torch.arange(2, dtype=I32, device=device))
    assert meta.shape == (6, 2) and meta.dtype == I32 and meta.device.type == device.type


def fp8(*shape, device):
    return torch.zeros(*shape, device=device).to(FP8)


def mqa_call(device, **change):
    args = dict(q=(fp8(4, 2, 16, device=device), None),
                kv=(fp8(6, 16, device=device), torch.ones(6, device=device)),
                weights=torch.zeros(4, 2, device=device), cu_seq_len_k_start=torch.zeros(4, dtype=I32, device=device),
                cu_seq_len_k_end=torch.full((4,), 6, dtype=I32, device=device))
    return lambda: deep_gemm.fp8_fp4_mqa_logits(**(args | change))


def paged_call(device, **change):
    args = dict(q=(fp8(2, 2, 2, 16, device=device), None),
                kv_cache=torch.zeros(4, 4, 1, 20, dtype=torch.uint8, device=device),
                weights=torch.zeros(4, 2, device=device), context_lens=torch.tensor([7, 3], dtype=I32, device=device),
                block_table=torch.tensor([[0, 1], [2, 3]], dtype=I32, device=device),
                schedule_meta=torch.zeros(5, 2, dtype=I32, device=device), max_context_len=8)
    return lambda: deep_gemm.fp8_fp4_paged_mqa_logits(**(args | change))


def int8(*shape, device):
    return torch.zeros(*shape, dtype=torch.int8, device=device)


BAD = [
    # FP4 inputs: refused by name
    ("mqa", lambda d: {"q": (int8(4, 2, 8, device=d), torch.zeros(4, 2, dtype=I32, device=d))}, ValueError,
     "q[1] (q_sf) must be None, got a torch.int32 tensor of shape [4, 2]: FP4 inputs are not supported"),
    ("mqa", lambda d: {"q": (int8(4, 2, 8, device=d), None)}, ValueError,
     "q[0] is torch.int8, DeepGEMM's FP4 layout: FP4 inputs are not supported"),
    ("mqa", lambda d: {"kv": (int8(6, 8, device=d), torch.zeros(6, dtype=I32, device=d))}, ValueError,
     "kv[0] (k) is torch.int8, DeepGEMM's FP4 layout"),
    ("mqa", lambda d: {"kv": (fp8(6, 16, device=d), torch.zeros(6, dtype=I32, device=d))}, ValueError,
     "kv[1] (k_scale) is torch.int32, DeepGEMM's FP4 layout"),
    ("paged", lambda d: {"q": (int8(2, 2, 2, 8, device=d), torch.zeros(2, 2, 2, dtype=I32, device=d))}, ValueError,
     "q[1] (q_sf) must be None"),
    # the current API's own arguments
    ("mqa", lambda d: {"q": fp8(4, 2, 16, device=d)}, TypeError, "q must be a (q_fp8, None) tuple, got Tensor"),
    ("mqa", lambda d: {"logits_dtype": torch.float16}, ValueError,
     "logits_dtype must be torch.float32 or torch.bfloat16, got torch.float16"),
    ("mqa", lambda d: {"logits_dtype": "bf16"}, TypeError, "logits_dtype must be torch.float32 or torch.bfloat16"),
    ("mqa", lambda d: {"weights": torch.zeros(4, 2, dtype=BF16, device=d)}, ValueError,
     "weights must have dtype torch.float32"),
    ("mqa", lambda d: {"max_seqlen_k": -1}, ValueError, "max_seqlen_k must be a non-negative int, got -1"),
    ("mqa", lambda d: {"max_seqlen_k": 2.5}, TypeError, "max_seqlen_k must be a non-negative int"),
    ("mqa", lambda d: {"cu_seq_len_k_start": torch.zeros(4, dtype=torch.int64, device=d)}, ValueError,
     "cu_seq_len_k_start must have dtype torch.int32"),
    ("mqa", lambda d: {"cu_seq_len_k_end": torch.zeros(3, dtype=I32, device=d)}, ValueError,
     "cu_seq_len_k_end must have shape [4]"),
    ("paged", lambda d: {"q": fp8(2, 2, 2, 16, device=d)}, TypeError, "q must be a (q_fp8, None) tuple"),
    ("paged", lambda d: {"logits_dtype": torch.float64}, ValueError, "logits_dtype must be torch.float32"),
    ("paged", lambda d: {"weights": torch.zeros(4, 2, dtype=BF16, device=d)}, ValueError,
     "weights must have dtype torch.float32"),
    ("paged", lambda d: {"context_lens": torch.zeros(2, 3, dtype=I32, device=d)}, ValueError,
     "context_lens must have shape [2, 2]"),
    ("paged", lambda d: {"context_lens": torch.zeros(2, 2, 1, dtype=I32, device=d)}, ValueError,
     "context_lens must have shape [2]"),
    ("paged", lambda d: {"indices": torch.zeros(2, dtype=torch.int64, device=d)}, ValueError,
     "indices must have dtype torch.int32"),
    ("paged", lambda d: {"indices": [0, 1]}, TypeError, "indices must be None or a torch.Tensor"),
    ("paged", lambda d: {"schedule_meta": None}, TypeError, "schedule_meta must be a torch.Tensor"),
    ("paged", lambda d: {"clean_logits": 1}, TypeError, "clean_logits must be True or False"),
]


@pytest.mark.parametrize("kind,change,error,says", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_argument_is_named(device, kind, change, error, says):
    call = (mqa_call if kind == "mqa" else paged_call)(device, **change(device))
    with pytest.raises(Exception) as info:
        call()
    message = str(info.value)
    assert type(info.value) is error, f"{type(info.value).__name__}: {message}"
    fn = "fp8_fp4_mqa_logits" if kind == "mqa" else "fp8_fp4_paged_mqa_logits"
    assert message.startswith(f"{fn}: ") and says in message and "\n" not in message, message


@pytest.mark.parametrize("change,error,says", [
    (dict(block_size=4, block_kv=4), TypeError, "pass block_size or block_kv (the same number), not both"),
    (dict(num_sms=4), TypeError, "missing block_size"),
    (dict(block_kv=4), TypeError, "missing num_sms"),
    (dict(block_kv=2**20 + 1, num_sms=4), ValueError, "block_kv=1048577 must be an int from 1 to 1048576"),
    (dict(block_kv=0, num_sms=4), ValueError, "block_kv must be a positive int, got 0"),
    (dict(block_size=4, num_sms=4, indices=torch.zeros(3, dtype=I32)), ValueError, "indices must have shape [2]"),
])
def test_bad_metadata_arguments_are_named(change, error, says):
    with pytest.raises(error) as info:
        deep_gemm.get_paged_mqa_logits_metadata(torch.tensor([7, 3], dtype=I32), **change)
    assert str(info.value).startswith("get_paged_mqa_logits_metadata: ") and says in str(info.value), str(info.value)
