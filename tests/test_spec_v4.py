"""DeepSeek-V4 from the spec: the shipped V4 specs (V4-Flash, V4-Pro and their tensor-parallel head
counts) load with the published numbers, and the V4 fields (attention.sink, cache.window, the MODEL1
cache) are validated with one-line errors naming the key."""
from __future__ import annotations

import glob

import pytest

import dsagen
from dsagen.errors import SpecError
from dsagen.spec import spec_from_dict

V4 = {  # file: (attention heads, index top-k)
    "specs/deepseek_v4_flash.toml": (64, 512),
    "specs/deepseek_v4_flash_tp4.toml": (16, 512),
    "specs/deepseek_v4_flash_tp8.toml": (8, 512),
    "specs/deepseek_v4_pro.toml": (128, 1024),
    "specs/deepseek_v4_pro_tp4.toml": (32, 1024),
    "specs/deepseek_v4_pro_tp8.toml": (16, 1024),
}


def test_every_shipped_spec_loads_and_round_trips():
    paths = sorted(glob.glob("specs/*.toml"))
    assert set(V4) <= set(paths)
    for path in paths:
        spec = dsagen.load_spec(path)
        assert spec_from_dict(spec.to_dict()) == spec, path


@pytest.mark.parametrize("path", sorted(V4), ids=lambda p: p.split("/")[-1][:-5])
def test_v4_specs_hold_the_published_shapes(path):
    spec = dsagen.load_spec(path)
    heads, k = V4[path]
    at, cache = spec.attention, spec.cache
    assert (at.heads, spec.topk.k) == (heads, k)
    assert (at.qk_dim, at.v_dim, at.rope_dim) == (512, 512, 0), "one 512-wide KV head, V all of it"
    assert at.sink and cache.window == 128 and cache.mla_format == "deepseek_v4_fp8"


def base(**sections):
    data = {"indexer": {"heads": 4, "head_dim": 32, "dtype": "fp8_e4m3"}, "topk": {"k": 16},
            "attention": {"heads": 8, "qk_dim": 512, "v_dim": 512, "dtype": "bf16"},
            "cache": {"mla_format": "deepseek_v4_fp8"}}
    for name, extra in sections.items():
        data[name] = data[name] | extra
    return data


def test_v4_fields_default_to_v32_behaviour():
    spec = dsagen.Spec()
    assert spec.attention.sink is False and dsagen.CacheSpec().window == 0
    spec = spec_from_dict(base())
    assert spec.attention.sink is False and spec.cache.window == 0


@pytest.mark.parametrize("section,key,value,message", [
    ("attention", "sink", 1, "attention.sink=1 must be true or false"),
    ("attention", "sink", "yes", "attention.sink='yes' must be true or false"),
    ("cache", "window", -1, r"cache.window=-1 is out of range: allowed 0 \(no window cache\)"),
    ("cache", "window", 2**21, r"cache.window=2097152 is out of range"),
    ("cache", "window", 1.5, r"cache.window=1.5 must be an integer"),
    ("cache", "window", True, r"cache.window=True must be an integer"),
])
def test_bad_v4_fields_are_named(section, key, value, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(base(**{section: {key: value}}))


def test_model1_cache_needs_v_to_be_the_whole_row():
    with pytest.raises(SpecError, match="attention.qk_dim and attention.v_dim must both be 512"):
        spec_from_dict(base(attention={"qk_dim": 576, "v_dim": 512}))


@pytest.mark.parametrize("page", [1, 53, 61, 576])
def test_model1_cache_takes_any_page_size(page):
    assert spec_from_dict(base(cache={"page_size": page})).cache.page_size == page
