"""DeepSeek-V4's MLA cache ("MODEL1", MLA_FORMATS["deepseek_v4_fp8"]): per page block, page x 576 B of
[448 e4m3 | 64 bf16], then page x 8 B of [7 ue8m0 scales | 1 pad], padded to a multiple of 576 B.
The codec is checked byte by byte against a quantization written here from the rule (ue8m0 scale
2^ceil(log2(max(amax / 448, 1e-4))), stored as its biased exponent), at odd page sizes."""
from __future__ import annotations

import math

import pytest
import torch

import dsagen
from dsagen.cache_formats import (MLA_FORMATS, allocate_mla_cache, check_mla_page_size, check_page_size,
                                  dequantize_mla_pages, dequantize_mla_rows, mla_block_bytes, quantize_mla_pages,
                                  quantize_mla_rows)

V4 = MLA_FORMATS["deepseek_v4_fp8"]
NOPE, ROPE, GROUP, DATA_ROW, SCALE_ROW, ALIGN = 448, 64, 64, 576, 8, 576
BF16_MAX = torch.finfo(torch.bfloat16).max


def padded_block_bytes(page: int) -> int:
    return math.ceil(page * 584 / ALIGN) * ALIGN


def scale_exponent(amax: float) -> int:
    """ceil(log2(max(amax / 448, 1e-4))), exactly (frexp: x = m 2^e, 0.5 <= m < 1)."""
    mantissa, exponent = math.frexp(max(amax / 448.0, 1e-4))
    return exponent - 1 if mantissa == 0.5 else exponent


def expected_bytes(rows: torch.Tensor, page: int) -> torch.Tensor:
    """The whole storage of the cache of `rows` (finite values), block by block, from the rule."""
    n_blocks = rows.shape[0] // page
    out = torch.zeros(n_blocks, padded_block_bytes(page), dtype=torch.uint8)
    for token in range(rows.shape[0]):
        b, t = divmod(token, page)
        row = rows[token]
        for g in range(7):
            group = row[g * GROUP:(g + 1) * GROUP].double()
            e = scale_exponent(group.abs().max().item())
            codes = (group / 2.0 ** e).to(torch.float8_e4m3fn).view(torch.uint8)
            out[b, t * DATA_ROW + g * GROUP:t * DATA_ROW + (g + 1) * GROUP] = codes
            out[b, page * DATA_ROW + t * SCALE_ROW + g] = e + 127
        out[b, t * DATA_ROW + NOPE:(t + 1) * DATA_ROW] = row[NOPE:].contiguous().view(torch.uint8)
    return out


def storage_of(cache: torch.Tensor) -> torch.Tensor:
    """The blocks' bytes behind the [blocks, page, 1, 584] view, padding included."""
    block = cache.stride(0)
    return cache.as_strided((cache.shape[0], block), (block, 1))


def spread_rows(gen, n: int) -> torch.Tensor:
    """bf16 rows whose groups span 1e-7 .. 1e30 in magnitude, one all-zero group and one tiny group."""
    mag = torch.logspace(-7, 30, n * 8).reshape(n, 8)[torch.randperm(n, generator=gen)]
    rows = torch.randn(n, 8, 64, generator=gen) * mag[..., None]
    rows = rows.reshape(n, 512).bfloat16()
    rows[0, 64:128] = 0
    rows[-1, 128:192] = (torch.randn(64, generator=gen) * 1e-3).bfloat16()  # amax / 448 below 1e-4
    return rows


def test_the_format_is_584_bytes_per_token_in_576_byte_multiples():
    assert (V4.bytes_per_token, V4.n_scales, V4.data_row_bytes) == (584, 7, 576)
    for page in (1, 53, 61, 64, 72):
        assert mla_block_bytes(V4, page) == padded_block_bytes(page)
        cache = allocate_mla_cache(V4, 3, page)
        assert cache.shape == (3, page, 1, 584) and cache.dtype == torch.uint8
        assert cache.stride() == (padded_block_bytes(page), 584, 584, 1)
        assert cache.untyped_storage().nbytes() == 3 * padded_block_bytes(page)
        assert (storage_of(cache) == 0).all()
    assert padded_block_bytes(1) == 2 * 576 and padded_block_bytes(64) == 65 * 576
    assert padded_block_bytes(72) == 72 * 584  # 584 / 576 = 73 / 72: 72 tokens fill blocks exactly


@pytest.mark.parametrize("page", [1, 53, 61])
def test_round_trip_is_the_rule_byte_for_byte(gen, page):
    n_blocks = 2 if page > 1 else 5
    rows = spread_rows(gen, n_blocks * page)
    cache = quantize_mla_pages(rows, V4, page)
    assert cache.shape == (n_blocks, page, 1, 584) and cache.stride(0) == padded_block_bytes(page)
    assert torch.equal(storage_of(cache), expected_bytes(rows, page))  # codes, rope, scales, zero pad
    back = dequantize_mla_pages(cache, V4)
    assert back.dtype == torch.float64 and back.shape == (n_blocks * page, 512)
    assert torch.equal(back[:, NOPE:], rows[:, NOPE:].double())  # rope stays bf16, exactly
    x = rows[:, :NOPE].double().reshape(-1, 7, GROUP)
    scale = torch.tensor([[2.0 ** scale_exponent(a) for a in token] for token in x.abs().amax(-1).tolist()],
                         dtype=torch.float64)
    err = (back[:, :NOPE].reshape(-1, 7, GROUP) - x).abs()
    assert (err <= x.abs() * 2.0 ** -4 + scale[..., None] * 2.0 ** -10).all()  # e4m3: 3 mantissa bits, subnormals
    assert (back[0, 64:128] == 0).all()


def one_token(values_by_group: dict[int, float]) -> torch.Tensor:
    row = torch.ones(1, 512, dtype=torch.bfloat16)
    for g, value in values_by_group.items():
        row[0, g * GROUP:(g + 1) * GROUP] = value
    return row


def test_scale_bytes_are_biased_exponents():
    """448 -> 2^0 (127); 450 -> 2 (128); zeros and tiny values -> the 1e-4 floor,
    2^-13 (114); bf16's largest -> 2^120 (247), its code 255 rounding to e4m3's 256: it comes back
    as 2^128, finite in float64 but past fp32's range."""
    row = one_token({0: 448.0, 1: 450.0, 2: 0.0, 3: 448 * 2.0 ** -13, 4: 448 * 2.0 ** -13 * (1 + 2 ** -7),
                     5: BF16_MAX, 6: -3e-30})
    cache = quantize_mla_pages(row, V4, 1)
    scales = storage_of(cache)[0, DATA_ROW:DATA_ROW + 8].tolist()
    assert scales == [127, 128, 114, 114, 115, 247, 114, 0]
    back = dequantize_mla_pages(cache, V4)
    assert torch.isfinite(back).all()
    assert back[0, 5 * GROUP].item() == 2.0 ** 128 and back[0, 0].item() == 448.0 and back[0, 2 * GROUP].item() == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_a_non_finite_value_makes_its_group_nan_and_only_it(bad):
    """As the V3.2 codec: the group's scale is ue8m0's NaN (0xFF), so every value of it dequantizes
    to NaN; the token's other groups and rope keep their values."""
    row = (torch.arange(512, dtype=torch.float32) / 7 - 30).bfloat16()[None, :]
    row[0, 2 * GROUP + 5] = bad
    row[0, NOPE + 3] = bad
    cache = quantize_mla_pages(row, V4, 1)
    scales = storage_of(cache)[0, DATA_ROW:DATA_ROW + 7]
    assert scales[2].item() == 0xFF and (scales[[0, 1, 3, 4, 5, 6]] != 0xFF).all()
    back = dequantize_mla_pages(cache, V4)
    assert torch.isnan(back[0, 2 * GROUP:3 * GROUP]).all()
    others = torch.cat([back[0, :2 * GROUP], back[0, 3 * GROUP:NOPE]])
    assert torch.isfinite(others).all()
    rope = back[0, NOPE:]
    assert rope[3].item() != rope[3].item() if bad != bad else rope[3].item() == bad
    assert torch.equal(torch.cat([rope[:3], rope[4:]]), torch.cat([row[0, NOPE:NOPE + 3], row[0, NOPE + 4:]]).double())


def test_page_sizes_of_the_block_format_are_any_positive_int():
    assert check_mla_page_size(V4, 53) is None and check_mla_page_size(V4, 1) is None
    for bad in (0, -4, True, 2.0):
        assert check_mla_page_size(V4, bad) == "must be an int >= 1"
        with pytest.raises(ValueError, match=rf"page_size={bad!r} must be an int >= 1 \(the deepseek_v4_fp8 cache\)"):
            allocate_mla_cache(V4, 1, bad)
    v32 = MLA_FORMATS["deepseek_v32_fp8"]  # the row format keeps the kernels' rule
    assert check_mla_page_size(v32, 53) is None
    assert check_mla_page_size(v32, 2**20 + 1) == check_page_size(2**20 + 1)


def test_bad_rows_and_caches_are_refused(gen):
    rows = torch.zeros(6, 512, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="6 rows do not fill whole blocks of page_size=4"):
        quantize_mla_pages(rows, V4, 4)
    with pytest.raises(ValueError, match=r"rows must be bf16 \(the deepseek_v4_fp8 cache"):
        quantize_mla_pages(rows.float(), V4, 3)
    with pytest.raises(ValueError, match=r"rows must be \[n_blocks \* page_size, 512\]"):
        quantize_mla_pages(rows[:, :448], V4, 3)
    with pytest.raises(ValueError, match="n_blocks=-1 must be an int >= 0"):
        allocate_mla_cache(V4, -1, 3)
    unpacked = torch.zeros(2, 3, 1, 600, dtype=torch.uint8)[..., :584]
    with pytest.raises(ValueError, match="cache must hold each block's 3 x 584 bytes packed"):
        dequantize_mla_pages(unpacked, V4)
    with pytest.raises(ValueError, match=r"cache must be a uint8 \[n_blocks, page_size, 1, 584\] tensor"):
        dequantize_mla_pages(torch.zeros(2, 3, 1, 656, dtype=torch.uint8), V4)


def test_the_page_functions_serve_the_v32_rows_too(gen):
    v32 = MLA_FORMATS["deepseek_v32_fp8"]
    rows = (torch.randn(32, 576, generator=gen) * 20).bfloat16()
    cache = quantize_mla_pages(rows, v32, 16)
    assert cache.shape == (2, 16, 1, 656) and cache.is_contiguous()
    assert torch.equal(cache.reshape(32, 656), quantize_mla_rows(rows, v32))
    assert torch.equal(dequantize_mla_pages(cache, v32), dequantize_mla_rows(cache.reshape(32, 656), v32))


@pytest.mark.parametrize("qk_dim, v_dim", [(576, 512), (512, 448)], ids=["v32-dims", "latent-448"])
def test_a_spec_naming_the_v4_cache_has_its_whole_row_as_q_and_v(qk_dim, v_dim):
    """The MODEL1 cache's V is the whole dequantized row (448 + 64): other dims get one line naming
    them, never a build that fails later; qk_dim = v_dim = 512 is accepted."""
    data = {"indexer": {"heads": 64, "head_dim": 128, "dtype": "fp8_e4m3"}, "topk": {"k": 2048},
            "attention": {"heads": 128, "qk_dim": qk_dim, "v_dim": v_dim, "dtype": "bf16"},
            "cache": {"mla_format": "deepseek_v4_fp8", "page_size": 53}}
    with pytest.raises(dsagen.SpecError, match="attention.qk_dim and attention.v_dim must both be 512"):
        dsagen.spec_from_dict(data)
    data["attention"].update(qk_dim=512, v_dim=512)
    assert dsagen.spec_from_dict(data).cache.mla_format == "deepseek_v4_fp8"
