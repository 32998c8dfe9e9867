"""Shared fixtures: where kernels run, a private module cache, input makers.

Kernel tests run on CUDA when torch sees a GPU (the H200 run) and on the CPU otherwise, where the
same generated modules run through the Triton interpreter. DSAGEN_TEST_DEVICE=cpu|cuda forces one.
"""
from __future__ import annotations

import os

import pytest
import torch


def _device() -> str:
    forced = os.environ.get("DSAGEN_TEST_DEVICE")
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(_device())


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Generated modules go to a per-session cache, never the user's."""
    old = os.environ.get("DSAGEN_CACHE_DIR")
    os.environ["DSAGEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("dsagen-cache"))
    yield
    if old is None:
        os.environ.pop("DSAGEN_CACHE_DIR", None)
    else:
        os.environ["DSAGEN_CACHE_DIR"] = old


def _backends() -> list:
    """Every backend, each kernel test runs on both; TVM only where apache-tvm imports."""
    from dsagen.backends.tvm import available

    tvm_reason = available()
    return ["triton", pytest.param("tvm", marks=pytest.mark.skipif(tvm_reason is not None, reason=str(tvm_reason)))]


@pytest.fixture(params=_backends())
def backend(request) -> str:
    return request.param


@pytest.fixture
def gen(device):
    """A fresh, seeded generator on the test device per test: new random inputs every test."""
    seed = int(os.environ.get("DSAGEN_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"random seed {seed} (rerun with DSAGEN_TEST_SEED={seed})")
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


@pytest.fixture(scope="session")
def child_env() -> dict:
    """Environment for a child Python process: this checkout first on PYTHONPATH, the rest kept
    (the GPU machine brings optuna and apache-tvm through PYTHONPATH)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
