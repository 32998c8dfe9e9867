"""Backends: Triton (compiled for CUDA, interpreted on the CPU) and TVM (llvm for the CPU, cuda)."""
from __future__ import annotations

from pathlib import Path

BACKENDS = ("triton", "tvm")


def launcher(backend: str, path: Path, kernel: str, device_type: str):
    """The launcher of a generated module for tensors on `device_type` ("cuda" or "cpu")."""
    if backend == "triton":
        from . import triton

        return triton.launcher(path, kernel, interpret=device_type == "cpu")
    if backend == "tvm":
        from . import tvm

        return tvm.launcher(path, kernel)
    raise ValueError(f"backend={backend!r}: allowed {', '.join(BACKENDS)}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported: allowed {', '.join(BACKENDS)}")
