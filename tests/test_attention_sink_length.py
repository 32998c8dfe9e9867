"""sparse_attention's optional attn_sink [H] and topk_length [S], applied inside the kernels.

Against the float64 reference on both backends (the Triton interpreter, TVM on llvm): odd head
counts and k, poisoned outputs, every kind of invalid index mixed in, sinks of +inf, -inf, 0 and
random values, lengths of 0, negative, exactly k, past k and random. The lse is the one without a
sink (bit for bit), a length equals the indices cut to it on the host (bit for bit), a NaN sink
reaches out of that head only, no index past k is read whatever the length. The specializations
compile for sm_90 (tl and both Gluon variants; TVM's CUDA source), and bad tensors are refused
naming the argument.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

import dsagen
from dsagen import reference
from dsagen.backends import triton as triton_backend
from dsagen.gpus import get_gpu
from dsagen.kernels import resolve_kernel
from dsagen.verify import assert_close


def attention_spec(heads: int, k: int, qk_dim: int = 80, v_dim: int = 48) -> dsagen.Spec:
    return dsagen.Spec(topk=dsagen.TopKSpec(k=k),
                       attention=dsagen.AttentionSpec(heads=heads, qk_dim=qk_dim, v_dim=v_dim))


def indices_with_invalid(gen, S: int, SKV: int, k: int) -> torch.Tensor:
    """Random valid indices with -2**31, -1, SKV and 2**31 - 1 mixed in; row 0 all invalid."""
    bad = torch.tensor([-(2**31), -1, SKV, 2**31 - 1])
    idx = torch.randint(0, SKV, (S, k), generator=gen)
    invalid = torch.rand(S, k, generator=gen) < 0.3
    invalid[0] = True
    idx = torch.where(invalid, bad[torch.randint(0, 4, (S, k), generator=gen)], idx)
    return idx.int()


def sinks(gen, heads: int) -> torch.Tensor:
    """+inf, -inf and 0 first, then random logits of the size of an lse (a few units)."""
    values = 3.0 * torch.randn(heads, generator=gen)
    values[:3] = torch.tensor([math.inf, -math.inf, 0.0])[:heads]
    return values


def lengths(gen, S: int, k: int) -> torch.Tensor:
    """0, negative, exactly k, past k (k + 1 and 2**31 - 1), -2**31, then random in [-2, k + 2]."""
    fixed = torch.tensor([0, -5, k, k + 1, 2**31 - 1, -(2**31), 1])
    random = torch.randint(-2, k + 3, (S,), generator=gen)
    return torch.cat([fixed, random])[:S].int()


def run(kernels, q, kv, idx, **optional):
    """out and lse from poisoned (NaN) buffers."""
    S, H = q.shape[:2]
    out = torch.full((S, H, kernels.spec.attention.v_dim), math.nan, dtype=torch.bfloat16, device=q.device)
    lse = torch.full((S, H), math.nan, dtype=torch.float32, device=q.device)
    return kernels.sparse_attention(q, kv, idx, None, out=out, lse=lse, **optional)


def problem(gen, device, S, SKV, H, K, qk_dim=80):
    q = torch.randn(S, H, qk_dim, generator=gen).bfloat16().to(device)
    kv = torch.randn(SKV, qk_dim, generator=gen).bfloat16().to(device)
    return q, kv, indices_with_invalid(gen, S, SKV, K).to(device)


CASES = [
    # S, SKV, heads, k, qk_dim, v_dim
    (9, 41, 3, 5, 80, 48),
    (8, 90, 10, 37, 80, 48),
    (7, 60, 5, 20, 576, 512),
]


def check_sink_and_length(kernels, gen, device, S: int, SKV: int) -> None:
    """The sink, the lengths and both against the float64 reference, on fresh random inputs."""
    at, K = kernels.spec.attention, kernels.spec.topk.k
    q, kv, idx = problem(gen, device, S, SKV, at.heads, K, at.qk_dim)
    sink, length = sinks(gen, at.heads).to(device), lengths(gen, S, K).to(device)
    for optional in ({"attn_sink": sink}, {"topk_length": length}, {"attn_sink": sink, "topk_length": length}):
        out, lse = run(kernels, q, kv, idx, **optional)
        ref_out, ref_lse = reference.sparse_attention(q.cpu(), kv.cpu(), idx.cpu(), at.softmax_scale, at.v_dim,
                                                      **{k: v.cpu() for k, v in optional.items()})
        assert_close("sparse_attention.out", out, ref_out)
        assert_close("sparse_attention.lse", lse, ref_lse)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "a poisoned output was left unwritten"
        assert torch.all(out[0] == 0) and torch.all(torch.isposinf(lse[0])), "no valid index: out 0, lse +inf"
        if "attn_sink" in optional:
            assert torch.all(out[:, 0] == 0), "a sink of +inf zeroes its head"
            _, plain_lse = run(kernels, q, kv, idx, topk_length=optional.get("topk_length"))
            assert torch.equal(lse, plain_lse), "the sink leaves lse as it is"
        if "topk_length" in optional:
            short = (length <= 0).to(device)
            assert short[:2].all() and short[5], "lengths 0, -5 and -2**31 are among the rows"
            assert torch.all(out[short] == 0) and torch.all(torch.isposinf(lse[short])), "a length <= 0 reads nothing"


@pytest.mark.parametrize("S,SKV,H,K,DQK,DV", CASES, ids=[f"S{c[0]}-H{c[2]}-K{c[3]}-DQK{c[4]}" for c in CASES])
def test_sink_and_length_match_reference(device, backend, gen, S, SKV, H, K, DQK, DV):
    check_sink_and_length(dsagen.build(attention_spec(H, K, DQK, DV), backend=backend), gen, device, S, SKV)


@pytest.mark.parametrize("variant", ["gluon", "gluon_split"])
def test_gluon_sink_and_length_match_reference(device, gen, variant):
    """On an sm_90 GPU (skipped elsewhere): both Gluon variants, two blocks of 64 heads."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        pytest.skip("the Gluon kernels run on sm_90 GPUs only")
    kernels = dsagen.build(attention_spec(96, 100, 576, 512), schedules={"sparse_attention": {"variant": variant}})
    assert kernels.resolve("sparse_attention", 9, 700, "cuda").variant == variant
    check_sink_and_length(kernels, gen, device, 9, 700)


@pytest.mark.parametrize("S,SKV,H,K", [(9, 41, 3, 5), (8, 90, 10, 37)])
def test_length_equals_indices_cut_on_the_host(device, backend, gen, S, SKV, H, K):
    """Masking in the kernel gives the same bits as the indices past each length set to -1."""
    kernels = dsagen.build(attention_spec(H, K), backend=backend)
    q, kv, idx = problem(gen, device, S, SKV, H, K)
    length = lengths(gen, S, K).to(device)
    position = torch.arange(K, device=device)
    cut = torch.where(position[None, :] < length[:, None].long(), idx, -1).int()
    out, lse = run(kernels, q, kv, idx, topk_length=length)
    cut_out, cut_lse = run(kernels, q, kv, cut)
    assert torch.equal(out, cut_out) and torch.equal(lse, cut_lse)


def test_no_index_past_k_is_read(device, backend, gen):
    """Indices as the first k columns of a wider buffer whose next columns hold valid indices: a
    length past k reads the k columns only."""
    S, SKV, H, K = 6, 50, 3, 5
    kernels = dsagen.build(attention_spec(H, K), backend=backend)
    q, kv, idx = problem(gen, device, S, SKV, H, K)
    wide = torch.randint(0, SKV, (S, 3 * K), generator=gen).int().to(device)
    wide[:, :K] = idx
    view = wide[:, :K]
    length = torch.full((S,), 3 * K, dtype=torch.int32, device=device)
    out, lse = run(kernels, q, kv, view, topk_length=length)
    ref_out, ref_lse = reference.sparse_attention(q.cpu(), kv.cpu(), idx.cpu(), kernels.spec.attention.softmax_scale,
                                                  48)
    assert_close("sparse_attention.out", out, ref_out)
    assert_close("sparse_attention.lse", lse, ref_lse)


def test_nan_sink_reaches_its_head_only(device, backend, gen):
    S, SKV, H, K = 5, 40, 4, 7
    kernels = dsagen.build(attention_spec(H, K), backend=backend)
    q, kv, idx = problem(gen, device, S, SKV, H, K)
    sink = torch.tensor([0.5, math.nan, -math.inf, 2.0], device=device)
    out, lse = run(kernels, q, kv, idx, attn_sink=sink)
    has_index = ((idx >= 0) & (idx < SKV)).any(1).cpu()
    assert not has_index[0] and has_index[1:].all()
    assert torch.isnan(out[1:, 1]).all(), "a NaN sink gives NaN out where the row has mass"
    assert torch.all(out[0] == 0), "a row without a valid index keeps out 0 whatever the sink"
    assert not torch.isnan(out[:, [0, 2, 3]]).any() and not torch.isnan(lse).any()


def test_positional_call_and_compiled_graph(device, gen):
    """attn_sink and topk_length follow sm_scale positionally, and torch.compile(fullgraph=True)
    traces a call that passes them."""
    S, SKV, H, K = 4, 30, 3, 5
    kernels = dsagen.build(attention_spec(H, K))
    q, kv, idx = problem(gen, device, S, SKV, H, K)
    sink, length = sinks(gen, H).to(device), lengths(gen, S, K).to(device)
    eager = kernels.sparse_attention(q, kv, idx, None, sink, length)
    compiled = torch.compile(lambda *a: kernels.sparse_attention(*a, attn_sink=sink, topk_length=length),
                             fullgraph=True, backend="aot_eager")(q, kv, idx)
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)


def test_bad_sink_and_length_name_the_argument(device):
    kernels = dsagen.build(attention_spec(3, 5))
    q = torch.zeros(4, 3, 80, dtype=torch.bfloat16, device=device)
    kv = torch.zeros(10, 80, dtype=torch.bfloat16, device=device)
    idx = torch.zeros(4, 5, dtype=torch.int32, device=device)
    cases = [
        ("attn_sink", {"attn_sink": torch.zeros(3, dtype=torch.bfloat16, device=device)}, "dtype"),
        ("attn_sink", {"attn_sink": torch.zeros(4, device=device)}, r"shape \[3\]"),
        ("attn_sink", {"attn_sink": torch.zeros(4, 3, device=device)}, r"shape \[3\]"),
        ("attn_sink", {"attn_sink": torch.zeros(3, device="meta")}, "is on meta"),
        ("attn_sink", {"attn_sink": [0.0, 0.0, 0.0]}, "torch.Tensor"),
        ("topk_length", {"topk_length": torch.zeros(4, dtype=torch.int64, device=device)}, "dtype"),
        ("topk_length", {"topk_length": torch.zeros(5, dtype=torch.int32, device=device)}, r"shape \[4\]"),
        ("topk_length", {"topk_length": torch.zeros(8, dtype=torch.int32, device=device)[::2]}, "contiguous"),
    ]
    for name, optional, match in cases:
        with pytest.raises(ValueError, match=rf"^{name}\b.*{match}"):
            kernels.sparse_attention(q, kv, idx, **optional)


@pytest.mark.parametrize("variant", ["tl", "gluon", "gluon_split"])
def test_specializations_compile_for_sm90(variant):
    """The sink and length specializations (with max_logits too) of every Triton variant compile
    for sm_90 on any machine."""
    spec = dsagen.load_spec("specs/deepseek_v32.toml")
    src = resolve_kernel(spec, "sparse_attention", "triton", "nvidia-h200", {"variant": variant})
    module = triton_backend.load(triton_backend.materialize(src.generated), interpret=False)
    (launch,) = module.compile_signature(max_logits=True, attn_sink=True, topk_length=True)
    assert launch[2]["HAS_SINK"] is True and launch[2]["HAS_LENGTH"] is True
    assert not module.compile_signature()[0][2]["HAS_SINK"] and not module.compile_signature()[0][2]["HAS_LENGTH"]
    shim = types.SimpleNamespace(compile_signature=lambda: [launch])
    (compiled,) = triton_backend.compile_for(shim, arch=90, aligned_strides=variant != "tl")
    assert compiled.asm.get("cubin") and ".target sm_90" in compiled.asm["ptx"]
    assert compiled.metadata.shared <= get_gpu("nvidia-h200").smem_per_block


def test_tvm_specializations_build_for_cuda():
    """TVM's CUDA kernel with the sink and the lengths (source only; no GPU needed)."""
    from dsagen.backends import tvm as tvm_backend

    if problem_ := tvm_backend.available():
        pytest.skip(problem_)
    built = dsagen.build(attention_spec(16, 64, 576, 512), backend="tvm")
    module = tvm_backend.load(built.path(built.resolve("sparse_attention", device_type="cpu")))
    plain = module.build("cuda").mod.imports[0].inspect_source()
    both = module.build("cuda", attn_sink=True, topk_length=True).mod.imports[0].inspect_source()
    assert "SINK_ptr" not in plain and "LEN_ptr" not in plain, "the default kernel takes neither"
    assert "SINK_ptr" in both and "LEN_ptr" in both
