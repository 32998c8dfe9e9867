"""The paged KV-cache formats of the decode path: the [cache] spec section and the host codecs."""
from __future__ import annotations

import pytest
import torch

import dsagen
from dsagen.cache_formats import (FP8_MAX, MLA_FORMATS, dequantize_mla_rows, pack_index_pages, pow2_scale,
                                  quantize_mla_rows, unpack_index_pages)

V32 = {"indexer": {"heads": 64, "head_dim": 128, "dtype": "fp8_e4m3"}, "topk": {"k": 2048},
       "attention": {"heads": 128, "qk_dim": 576, "v_dim": 512, "dtype": "bf16"}}


def test_the_cache_section_is_optional_and_round_trips():
    assert dsagen.spec_from_dict(V32).cache is None
    spec = dsagen.spec_from_dict({**V32, "cache": {"page_size": 32}})
    assert spec.cache == dsagen.CacheSpec(page_size=32, mla_format="deepseek_v32_fp8", index_format="deepgemm_fp8")
    assert dsagen.spec_from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("cache,message", [
    ({"page_size": 2**20 + 1}, "cache.page_size=1048577 must be an int from 1 to 1048576"),
    ({"page_size": 0}, "cache.page_size=0 must be an int from 1 to"),
    ({"page_size": True}, "cache.page_size=True must be an int from 1 to"),
    ({"mla_format": "v4"}, "cache.mla_format='v4' is not supported: allowed 'deepseek_v32_fp8'"),
    ({"index_format": 3}, "cache.index_format=3 is not supported"),
    ({"paeg_size": 64}, "unknown key cache.paeg_size"),
])
def test_a_bad_cache_section_names_the_key(cache, message):
    with pytest.raises(dsagen.SpecError, match=message):
        dsagen.spec_from_dict({**V32, "cache": cache})


def test_the_mla_format_must_fit_the_attention_dims():
    data = {**V32, "attention": {"heads": 16, "qk_dim": 448, "v_dim": 384, "dtype": "bf16"}, "cache": {}}
    with pytest.raises(dsagen.SpecError, match="holds 512 latent \\+ 64 rope values per token"):
        dsagen.spec_from_dict(data)


def test_v32_rows_are_656_bytes_and_round_trip_within_fp8_error(gen):
    fmt = MLA_FORMATS["deepseek_v32_fp8"]
    assert fmt.bytes_per_token == 656 and fmt.n_scales == 4
    rows = (torch.randn(37, 576, generator=gen) * torch.logspace(-6, 3, 37)[:, None]).bfloat16()
    rows[3, 128:256] = 0  # an all-zero group: amax clamps at 1e-4
    cache = quantize_mla_rows(rows, fmt)
    back = dequantize_mla_rows(cache, fmt)
    assert torch.equal(back[:, 512:], rows[:, 512:].double())  # rope stays bf16, exactly
    scales = cache[:, 512:528].contiguous().view(torch.float32).double()
    assert torch.equal(torch.log2(scales), torch.round(torch.log2(scales)))  # powers of two
    assert torch.equal(scales, pow2_scale(rows[:, :512].double().reshape(37, 4, 128).abs().amax(-1)).float().double())
    err = (back[:, :512] - rows[:, :512].double()).abs().reshape(37, 4, 128)
    assert (err <= scales[..., None] * FP8_MAX * 2**-4).all()  # e4m3: 3 mantissa bits
    assert (back[3, 128:256] == 0).all()


def test_index_pages_pack_keys_then_scales(gen):
    keys = (torch.randn(3 * 16, 40, generator=gen) * 50).to(torch.float8_e4m3fn)
    scales = torch.rand(48, generator=gen)
    cache = pack_index_pages(keys, scales, 16)
    assert cache.shape == (3, 16, 1, 44) and cache.dtype == torch.uint8
    flat = cache.reshape(3, -1)
    assert torch.equal(flat[1, :16 * 40].view(torch.float8_e4m3fn).float(), keys[16:32].float().reshape(-1))
    got_keys, got_scales = unpack_index_pages(cache, 40)
    assert torch.equal(got_keys, keys.double()) and torch.equal(got_scales, scales.double())
