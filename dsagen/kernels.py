"""Run: `dsagen.build(spec)` -> an object whose .indexer/.topk/.sparse_attention/.dsa take torch tensors.

Step 6 of the pipeline. Every argument is checked (dtype, shape, device, strides) before any launch,
and a bad one raises ValueError naming it. CUDA tensors run the compiled kernels; CPU tensors run the
very same generated modules through the Triton interpreter.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, NamedTuple

import torch

from .backends import triton as triton_backend
from .errors import BackendError
from .gpus import GPU, get_gpu, gpu_type_from_device_name, GPUS
from .pipeline import DEFAULT_GPU, KernelSource, all_sources
from .spec import Spec

log = logging.getLogger("dsagen")

_TORCH_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "bf16": torch.bfloat16}


class DSAOutput(NamedTuple):
    out: torch.Tensor  # [S, H, Dv] bf16
    lse: torch.Tensor  # [S, H] fp32, natural log, +inf where no index was valid
    indices: torch.Tensor  # [S, k] int32, -1 padded


# ---------------------------------------------------------------------------------------------
# argument checks

def _check(name: str, t, dtype, shape: tuple, device: torch.device | None = None,
           contiguous_last: bool = True) -> None:
    """shape entries: an int (must match) or None (any size)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, but the other inputs are on {device}")
    if t.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name} is on {t.device}: dsagen runs on cuda (compiled) or cpu (interpreted)")
    if contiguous_last and t.numel() > 0 and t.dim() > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got strides {t.stride()}")


def _check_out(name: str, t, dtype, shape: tuple, device) -> None:
    if t is not None:
        _check(name, t, dtype, shape, device)


class DSAKernels:
    """The three generated kernels of one spec, plus their composition."""

    def __init__(self, spec: Spec, sources: Mapping[str, KernelSource], backend: str = "triton"):
        self.spec = spec
        self.backend = backend
        self.sources = dict(sources)
        self._paths = {k: triton_backend.materialize(s.generated) for k, s in self.sources.items()}
        for kernel, src in self.sources.items():
            log.info("dsagen: %s uses schedule %s (%s), module %s", kernel, src.choice.point,
                     src.choice.source, src.generated.module_name)

    def launcher(self, kernel: str, device: torch.device):
        """The generated launcher for a device: compiled for CUDA, interpreted for CPU."""
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("CUDA tensors were given but torch sees no CUDA device")
        return triton_backend.launcher(self._paths[kernel], kernel, interpret=device.type == "cpu")

    def explain(self) -> dict[str, dict]:
        return {k: {"schedule": s.choice.point, "source": s.choice.source, "module": s.generated.module_name,
                    "path": str(self._paths[k])} for k, s in self.sources.items()}

    # -- stage 1 ---------------------------------------------------------------------------
    def indexer(self, q, k, k_scale, weights, ks, ke, *, out=None):
        """logits [S, SKV] fp32: k_scale[s] * sum_j weights[t,j] * relu(q[t,j] . k[s]) in [ks[t], ke[t])."""
        ix = self.spec.indexer
        dtype = _TORCH_DTYPES[ix.dtype]
        _check("q", q, dtype, (None, ix.heads, ix.head_dim))
        dev = q.device
        n_q = q.shape[0]
        _check("k", k, dtype, (None, ix.head_dim), dev)
        n_kv = k.shape[0]
        if k_scale is not None:
            _check("k_scale", k_scale, torch.float32, (n_kv,), dev)
        _check("weights", weights, torch.float32, (n_q, ix.heads), dev)
        _check("ks", ks, torch.int32, (n_q,), dev)
        _check("ke", ke, torch.int32, (n_q,), dev)
        _check_out("out", out, torch.float32, (n_q, n_kv), dev)
        return self.launcher("indexer", dev)(q, k, k_scale, weights, ks, ke, out=out)

    # -- stage 2 ---------------------------------------------------------------------------
    def topk(self, logits, ks, ke, *, out=None):
        """indices [S, k] int32: the k largest logits of each row's window [ks, ke), then -1 padding."""
        _check("logits", logits, torch.float32, (None, None))
        dev = logits.device
        n_q = logits.shape[0]
        _check("ks", ks, torch.int32, (n_q,), dev)
        _check("ke", ke, torch.int32, (n_q,), dev)
        _check_out("out", out, torch.int32, (n_q, self.spec.topk.k), dev)
        return self.launcher("topk", dev)(logits, ks, ke, out=out)

    # -- stage 3 ---------------------------------------------------------------------------
    def sparse_attention(self, q, kv, indices, sm_scale: float | None = None, *, out=None, lse=None):
        """(out [S, H, Dv] bf16, lse [S, H] fp32): softmax over each query's valid selected kv rows."""
        at = self.spec.attention
        dtype = _TORCH_DTYPES[at.dtype]
        _check("q", q, dtype, (None, at.heads, at.qk_dim))
        dev = q.device
        n_q = q.shape[0]
        _check("kv", kv, dtype, (None, at.qk_dim), dev)
        _check("indices", indices, torch.int32, (n_q, self.spec.topk.k), dev)
        if sm_scale is not None:
            if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)) \
                    or not math.isfinite(sm_scale) or sm_scale <= 0:
                raise ValueError(f"sm_scale={sm_scale!r} must be a finite number > 0")
        _check_out("out", out, dtype, (n_q, at.heads, at.v_dim), dev)
        _check_out("lse", lse, torch.float32, (n_q, at.heads), dev)
        if kv.shape[0] >= 2**31 - 1:
            raise ValueError(f"kv has {kv.shape[0]} rows: int32 indices address at most 2**31 - 2")
        return self.launcher("sparse_attention", dev)(
            q, kv, indices, sm_scale=sm_scale, out=out, lse=lse)

    # -- all three -------------------------------------------------------------------------
    def dsa(self, q, kv, index_q, index_k, index_k_scale, index_weights, ks, ke,
            sm_scale: float | None = None) -> DSAOutput:
        """Indexer -> top-k -> sparse attention for one flattened batch of S query tokens."""
        if isinstance(q, torch.Tensor) and isinstance(index_q, torch.Tensor) and q.shape[0] != index_q.shape[0]:
            raise ValueError(f"q has {q.shape[0]} tokens but index_q has {index_q.shape[0]}")
        if isinstance(kv, torch.Tensor) and isinstance(index_k, torch.Tensor) and kv.shape[0] != index_k.shape[0]:
            raise ValueError(f"kv has {kv.shape[0]} rows but index_k has {index_k.shape[0]}")
        logits = self.indexer(index_q, index_k, index_k_scale, index_weights, ks, ke)
        indices = self.topk(logits, ks, ke)
        out, lse = self.sparse_attention(q, kv, indices, sm_scale)
        return DSAOutput(out, lse, indices)


def current_gpu() -> GPU:
    """The GPU type of cuda:0 when it is one dsagen knows, else the planning default."""
    if torch.cuda.is_available():
        name = gpu_type_from_device_name(torch.cuda.get_device_name(0))
        if name in GPUS:
            return get_gpu(name)
        log.warning("dsagen: GPU %r is not in dsagen's table; planning for %s", name, DEFAULT_GPU)
    return get_gpu(DEFAULT_GPU)


def build(spec: Spec, backend: str = "triton", gpu: str | None = None,
          schedules: Mapping[str, Mapping[str, int]] | None = None) -> DSAKernels:
    """Generate (or fetch from the cache) the three kernels of `spec` for `backend`.

    schedules: optional {kernel: {knob: value}} overriding the spec's pinned knobs.
    """
    if backend != "triton":
        raise ValueError(f"backend={backend!r} is not supported yet: allowed 'triton'")
    target = get_gpu(gpu) if gpu else current_gpu()
    return DSAKernels(spec, all_sources(spec, backend, target, schedules), backend)
