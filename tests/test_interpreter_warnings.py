"""NaN in the data is a value, not a mistake: an interpreted (CPU) Triton launch computes on it as a
GPU would, silently, without NumPy's RuntimeWarnings reaching the caller; the silence ends with
the launch."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import dsagen
from dsagen import reference
from dsagen.backends import triton as triton_backend
from dsagen.verify import assert_close


def small_spec() -> dsagen.Spec:
    """k = 64 keys per token: one full key block, so a NaN query makes a whole row of scores NaN."""
    return dsagen.Spec(indexer=dsagen.IndexerSpec(heads=3, head_dim=50, dtype="bf16"), topk=dsagen.TopKSpec(k=64),
                       attention=dsagen.AttentionSpec(heads=5, qk_dim=80, v_dim=48, dtype="bf16"))


def nan_inputs(gen, S: int = 5, SKV: int = 70):
    q = torch.randn(S, 5, 80, generator=gen).bfloat16()
    kv = torch.randn(SKV, 80, generator=gen).bfloat16()
    q[2, 1, 3] = math.nan  # every score of token 2, head 1 is NaN: NumPy's max warns "All-NaN slice"
    kv[11, 5] = math.nan  # a NaN row: every head of the tokens that select it is NaN
    picks = torch.stack([torch.randperm(SKV - 1, generator=gen)[:64] for _ in range(S)])
    idx = (picks + (picks >= 11)).int()  # distinct keys, none of them row 11 ...
    idx[4, 3] = 11  # ... but for token 4
    return q, kv, idx


def runtime_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def assert_nan_where_reference_then_close(what: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    nan_ref = torch.isnan(ref)
    assert nan_ref.any() and not nan_ref.all(), "the inputs must make some entries NaN and not others"
    assert torch.equal(torch.isnan(got.double()), nan_ref), f"{what}: NaN positions differ from the reference"
    assert_close(what, got.double().masked_fill(nan_ref, 0.0), ref.masked_fill(nan_ref, 0.0))


def test_nan_inputs_raise_no_runtime_warning_under_the_interpreter(gen):
    if problem := triton_backend.interpreter_problem():
        pytest.skip(problem)
    q, kv, idx = nan_inputs(gen)
    S = q.shape[0]
    kernels = dsagen.build(small_spec())
    errstate, filters = np.geterr(), list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning a launch lets through is recorded
        out, lse = kernels.sparse_attention(q, kv, idx, 0.125, out=torch.full((S, 5, 48), 3.0, dtype=torch.bfloat16),
                                            lse=torch.full((S, 5), 3.0))
        assert runtime_warnings(caught) == []
        np.nanmax(np.full(3, np.nan))  # the same warning outside a launch still reaches the caller
        assert runtime_warnings(caught) == ["All-NaN slice encountered"]
    assert np.geterr() == errstate and warnings.filters == filters
    ref_out, ref_lse = reference.sparse_attention(q, kv, idx, 0.125, 48)
    assert torch.isnan(ref_lse[2, 1]) and torch.isnan(ref_lse[4]).all() and not torch.isnan(ref_lse[0]).any()
    assert_nan_where_reference_then_close("sparse_attention.out", out, ref_out)
    assert_nan_where_reference_then_close("sparse_attention.lse", lse, ref_lse)


def test_a_caller_who_asks_numpy_to_raise_is_not_silenced(gen):
    """np.errstate(...="raise") is a request to know: the launch leaves NumPy's settings, and the
    warnings, to the caller (the strict interpreter tests of tests/test_numerics.py rely on it)."""
    if problem := triton_backend.interpreter_problem():
        pytest.skip(problem)
    q, kv, idx = nan_inputs(gen)
    kernels = dsagen.build(small_spec())
    with warnings.catch_warnings(record=True) as caught, np.errstate(divide="raise", over="raise", invalid="raise"):
        warnings.simplefilter("always")
        kernels.sparse_attention(q, kv, idx, 0.125)
    assert "All-NaN slice encountered" in runtime_warnings(caught)
