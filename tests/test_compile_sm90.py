"""Every generated Triton kernel compiles for the H200 (sm_90) on this machine, GPU or not.

Covers each kernel family for the V3.2 spec, an odd-shaped spec (3 heads, dims that are no power
of two, no rope part), DeepSeek-V4 at TP8 (the MODEL1 cache; the sink, length and window
specializations) and the knob values the CPU tests do not reach by default (v_split, radix,
index prefetch, bracket sizes, multi-row fused selection, the decode orientations and orders).
"""
from __future__ import annotations

import types

import pytest

import dsagen
from dsagen.backends import triton as triton_backend
from dsagen.gpus import get_gpu
from dsagen.kernels import resolve_kernel

V32 = dsagen.load_spec("specs/deepseek_v32.toml")
ODD = dsagen.Spec(
    indexer=dsagen.IndexerSpec(heads=3, head_dim=50, dtype="bf16"),
    topk=dsagen.TopKSpec(k=7),
    attention=dsagen.AttentionSpec(heads=3, qk_dim=48, v_dim=48),
)

V32_H64 = dsagen.Spec(topk=V32.topk, attention=dsagen.AttentionSpec(heads=64, sm_scale=V32.attention.sm_scale))
V32_H40 = dsagen.Spec(topk=V32.topk, attention=dsagen.AttentionSpec(heads=40, sm_scale=V32.attention.sm_scale))

V4_TP8 = dsagen.load_spec("specs/deepseek_v4_flash_tp8.toml")  # 8 heads, top-k 512, the MODEL1 cache, sinks, a window

PAGED_V32 = dsagen.Spec(indexer=V32.indexer, cache=dsagen.CacheSpec())  # pages of 64 tokens
PAGED_ODD = dsagen.Spec(indexer=dsagen.IndexerSpec(heads=3, head_dim=50), cache=dsagen.CacheSpec(page_size=16))

CASES = [
    ("v32", V32, "indexer", None),
    ("v32", V32, "topk", None),
    ("v32", V32, "sparse_attention", None),
    ("odd", ODD, "indexer", None),
    ("odd", ODD, "topk", None),
    ("odd", ODD, "sparse_attention", None),
    ("v32", V32, "sparse_attention", {"block_h": 32, "block_n": 32, "num_warps": 4, "num_stages": 3, "v_split": 2}),
    ("v32", V32, "sparse_attention", {"index_prefetch": 1}),
    ("v32", V32, "sparse_attention", {"variant": "gluon"}),
    ("v32", V32, "sparse_attention", {"variant": "gluon", "block_n": 32, "num_stages": 3}),
    ("v32", V32, "sparse_attention", {"variant": "gluon_split", "block_n": 32, "num_stages": 3}),
    ("v32", V32_H64, "sparse_attention", {"variant": "gluon_split"}),
    ("v32", V32_H40, "sparse_attention", {"variant": "gluon", "block_n": 32}),
    ("v32", V32, "topk", {"block_n": 4096, "radix_bits": 2, "num_warps": 16, "resident_max": 0, "sample": 0}),
    ("v32", V32, "topk", {"block_n": 2048, "sample": 1024, "candidates": 2048, "num_warps": 8, "row_reads": 2}),
    ("v32", V32, "topk", {"block_n": 512, "sample": 2048, "candidates": 4096, "num_warps": 8, "row_reads": 1}),
    ("v32", V32, "topk", {"resident_max": 32768, "resident_warps": 32}),
    ("v32", V32, "indexer", {"block_m": 64, "block_h": 1, "block_n": 64, "num_warps": 4, "num_stages": 4}),
    ("v32", V32, "indexer_topk", None),
    ("v32", V32, "indexer_topk", {"block_m": 8, "block_h": 8, "block_n": 128, "sample": 256, "candidates": 512,
                                  "num_stages": 2}),
    ("odd", ODD, "indexer_topk", None),
    ("v32", PAGED_V32, "paged_indexer", None),
    ("v32", PAGED_V32, "paged_indexer", {"block_n": 128, "block_h": 16, "key_blocks": 2, "num_warps": 8,
                                         "num_stages": 2}),
    ("odd", PAGED_ODD, "paged_indexer", None),
    ("v32", dsagen.Spec(cache=dsagen.CacheSpec()), "mla_cache_write", None),
    ("odd", dsagen.Spec(cache=dsagen.CacheSpec(page_size=1)), "mla_cache_write", {"block_r": 16, "num_warps": 8}),
    ("v32", dsagen.Spec(topk=V32.topk, attention=V32.attention, cache=dsagen.CacheSpec()), "sparse_decode", None),
    ("v32", dsagen.Spec(topk=V32.topk, attention=V32.attention, cache=dsagen.CacheSpec()), "sparse_decode",
     {"block_h": 32, "block_n": 64, "k_split": 8, "num_warps": 4, "num_stages": 3}),
    ("odd", dsagen.Spec(attention=dsagen.AttentionSpec(heads=3), topk=dsagen.TopKSpec(k=7),
                        cache=dsagen.CacheSpec(page_size=1)), "sparse_decode", None),
    ("v32", dsagen.Spec(topk=V32.topk, attention=V32.attention, cache=dsagen.CacheSpec()), "sparse_decode",
     {"block_h": 64, "block_n": 32, "prefetch": 1, "num_warps": 16, "num_stages": 4}),
    ("v32", PAGED_V32, "paged_indexer", {"key_rows": 0}),
    ("v32", dsagen.Spec(cache=dsagen.CacheSpec()), "decode_topk", None),
    ("v32", dsagen.Spec(cache=dsagen.CacheSpec()), "decode_topk",
     {"sorted": 1, "levels": 1, "radix_bits": 11, "block_n": 2048, "chunk": 2048, "candidates": 8192, "num_warps": 16}),
    ("odd", dsagen.Spec(topk=dsagen.TopKSpec(k=7), cache=dsagen.CacheSpec(page_size=1)), "decode_topk", {"sorted": 1}),
    ("v32", V32, "sparse_attention_bwd", None),
    ("v32", V32, "sparse_attention_bwd", {"deterministic_dkv": 1}),
    ("v32", V32, "sparse_attention_bwd", {"block_h": 16, "block_n": 16, "num_warps": 4, "num_stages": 2}),
    ("odd", ODD, "sparse_attention_bwd", {"deterministic_dkv": 1}),
    ("v32", V32, "lse_merge", None),  # bf16 and fp32 partials, each without and with a sink
    ("v4", V4_TP8, "sparse_decode", None),
    ("v4", V4_TP8, "sparse_decode", {"block_h": 16, "block_n": 32, "k_split": 4, "num_warps": 4, "num_stages": 2}),
    ("v4", V4_TP8, "mla_cache_write", None),
    ("v4", V4_TP8, "sparse_attention", None),
    ("v4", V4_TP8, "sparse_attention_bwd", None),
]


def v4_launches(module, kernel: str) -> list:
    """The plain launches and those of a DeepSeek-V4 step: the sink, the lengths and, in decode,
    the window cache (with its own lengths)."""
    plain = module.compile_signature()
    if kernel == "sparse_decode":
        return plain + module.compile_signature(attn_sink=True, topk_length=True, extra=True, extra_topk_length=True)
    if kernel in ("sparse_attention", "sparse_attention_bwd"):
        return plain + module.compile_signature(attn_sink=True, topk_length=True)
    return plain


@pytest.mark.parametrize("name,spec,kernel,override", CASES,
                         ids=[f"{c[0]}-{c[2]}-{'default' if c[3] is None else 'variant'}" for c in CASES])
def test_compiles_for_sm90(name, spec, kernel, override):
    src = resolve_kernel(spec, kernel, "triton", "nvidia-h200", override)
    module = triton_backend.load(triton_backend.materialize(src.generated), interpret=False)
    launches = v4_launches(module, kernel) if name == "v4" else module.compile_signature()
    if name == "v4" and kernel != "mla_cache_write":
        assert len(launches) > len(module.compile_signature()), "the V4 specializations are compiled too"
    shim = types.SimpleNamespace(compile_signature=lambda: launches)
    for compiled in triton_backend.compile_for(shim, arch=90):
        assert compiled.asm.get("cubin"), "no sm_90 machine code produced"
        assert ".target sm_90" in compiled.asm["ptx"]
        assert compiled.metadata.shared <= get_gpu("nvidia-h200").smem_per_block
