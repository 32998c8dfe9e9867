"""Run: `dsagen.build(spec)` -> an object whose .indexer/.topk/.sparse_attention/.dsa take torch tensors.

Step 6 of the pipeline. Every argument is checked (dtype, shape, device, strides) before any launch,
and a bad one raises ValueError naming it. CUDA tensors run the compiled kernels; CPU tensors run the
very same generated modules through the Triton interpreter.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple

import torch

from . import backends
from .backends.source_cache import materialize
from .backends import tvm as tvm_backend
from .codegen import render
from .errors import BackendError, ScheduleError
from .gpus import GPUS, cpu_type, get_gpu, gpu_type_from_device_name
from .lower import kernel_context
from .pipeline import DEFAULT_GPU
from .plan import problem_symbols
from .schedule import choose, load_space
from .spec import ALL_KERNELS, KERNELS, Spec
from .tuning import db as tuning_db
from .tuning.buckets import bucket_of

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


@dataclass(frozen=True)
class Resolved:
    """The schedule one kernel runs with at one shape bucket, where it came from, and its module."""

    kernel: str
    point: dict
    source: str  # "override", "tuned (exact bucket ...)", ..., "pinned", "default", ...
    bucket: str | None  # None: not looked up by shape (CPU interpreter, override, no GPU type)
    module_name: str
    path: Path
    stale: tuple[str, ...] = ()


class DSAKernels:
    """The three generated kernels of one spec, plus their composition.

    The schedule of each kernel is resolved per shape bucket at the first call that has it:
    `schedules=` override -> tuning database (exact bucket -> nearest bucket -> another GPU type of
    the same compute capability) -> the spec's pinned knobs -> defaults. `explain()` says which.
    """

    def __init__(self, spec: Spec, backend: str = "triton", gpu_type: str | None = None,
                 compute_capability: str | None = None,
                 overrides: Mapping[str, Mapping[str, int]] | None = None, use_db: bool = True,
                 target: str | None = None):
        self.spec = spec
        self.backend = backend
        self.target = target  # None: follow the tensors' device
        self.gpu_type = gpu_type  # None: no tuning database (no GPU known)
        self.compute_capability = compute_capability
        self.plan_gpu = get_gpu(gpu_type) if gpu_type in GPUS else get_gpu(DEFAULT_GPU)
        self.overrides = {k: dict(v) for k, v in (overrides or {}).items()}
        self.use_db = use_db
        self._resolved: dict[tuple[str, str | None], Resolved] = {}
        self._lock = threading.Lock()
        for kernel in self.overrides:  # a bad override fails at build time, naming the knob
            if kernel not in ALL_KERNELS:
                raise ValueError(f"schedules: unknown kernel {kernel!r}: allowed {', '.join(ALL_KERNELS)}")
            self.resolve(kernel)

    def resolve(self, kernel: str, S: int | None = None, SKV: int | None = None,
                device_type: str = "cuda") -> Resolved:
        """The schedule and module `kernel` uses for a problem of S queries and SKV keys."""
        db_type = self._db_type(device_type)
        by_shape = (kernel not in self.overrides and self.use_db and db_type is not None
                    and S is not None and SKV is not None and S > 0 and SKV > 0)
        bucket = bucket_of(S, SKV) if by_shape else None
        with self._lock:
            interpret = device_type == "cpu" and self.backend == "triton"
            hit = self._resolved.get((kernel, bucket, db_type, interpret))
            if hit is None:
                hit = self._resolved[(kernel, bucket, db_type, interpret)] = self._resolve(
                    kernel, S, SKV, bucket, db_type, interpret)
                log.info("dsagen: %s%s uses %s (%s), module %s", kernel, f" {bucket}" if bucket else "",
                         hit.point, hit.source, hit.module_name)
                if hit.stale:
                    log.warning("dsagen: the tuned schedule of %s %s is stale but used: %s", kernel, bucket,
                                "; ".join(hit.stale))
        return hit

    def _db_type(self, device_type: str) -> str | None:
        """Whose tuning database applies: the GPU type on CUDA; the CPU type for TVM on the CPU;
        none for the Triton interpreter (its timings mean nothing)."""
        if device_type == "cuda":
            return self.gpu_type
        return cpu_type() if self.backend == "tvm" else None

    def _resolve(self, kernel: str, S, SKV, bucket: str | None, db_type: str | None, interpret: bool) -> Resolved:
        stale: tuple[str, ...] = ()
        if kernel in self.overrides:
            choice = choose(self.spec, kernel, self.plan_gpu, self.backend, self.overrides[kernel])
            point, source = choice.point, "override"
        else:
            found = self._lookup(kernel, S, SKV, db_type) if bucket else None
            if found is not None:
                point, source, stale = found.entry.schedule, f"{found.source}, {found.path}", tuple(found.stale)
            else:
                choice = choose(self.spec, kernel, self.plan_gpu, self.backend)
                point, source = choice.point, choice.source
        generated = render(self.backend, kernel_context(self.spec, kernel, point, self.backend, interpret))
        return Resolved(kernel, dict(point), source, bucket, generated.module_name,
                        materialize(generated), stale)

    def _lookup(self, kernel: str, S: int, SKV: int, db_type: str):
        """A tuning-database entry whose schedule is legal for this spec here, else None (logged)."""
        cc = self.compute_capability if db_type == self.gpu_type else "cpu"
        space = load_space(self.backend, kernel)
        found = tuning_db.lookup(kernel=kernel, backend=self.backend, spec_hash=self.spec.semantic_hash(kernel),
                                 S=S, SKV=SKV, gpu_type=db_type, compute_capability=cc,
                                 usable=lambda entry: space.names_every_knob(entry.schedule))
        if found is None:
            return None
        pinned = self.spec.pinned(kernel)
        if any(found.entry.schedule.get(k) != v for k, v in pinned.items()):
            log.info("dsagen: the tuned schedule of %s in %s disagrees with the spec's pinned knobs %s: not used",
                     kernel, found.path, pinned)
            return None
        try:
            space.check_names(found.entry.schedule, "tuned schedule")
            broken = space.violations(found.entry.schedule, problem_symbols(self.spec, kernel, self.plan_gpu))
        except ScheduleError as exc:
            broken = [str(exc)]
        if broken:
            log.warning("dsagen: ignoring the tuned schedule of %s in %s: it does not fit today's search space "
                        "(%s)", kernel, found.path, "; ".join(broken))
            return None
        return found

    def launcher(self, kernel: str, device: torch.device, S: int | None = None, SKV: int | None = None):
        """The generated launcher for a device: compiled for CUDA, interpreted for CPU."""
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("CUDA tensors were given but torch sees no CUDA device")
        if self.target is not None and self.target != ("cuda" if device.type == "cuda" else
                                                       ("llvm" if self.backend == "tvm" else "cpu")):
            raise ValueError(f"these kernels were built with target={self.target!r} but got {device.type} tensors")
        hit = self.resolve(kernel, S, SKV, device.type)
        return backends.launcher(self.backend, hit.path, kernel, device.type)

    def explain(self, S: int | None = None, SKV: int | None = None, device_type: str = "cuda") -> dict[str, dict]:
        """Per kernel: schedule, where it came from, module and file, for a problem of (S, SKV)."""
        out = {}
        for kernel in KERNELS:
            hit = self.resolve(kernel, S, SKV, device_type)
            out[kernel] = {"schedule": hit.point, "source": hit.source, "bucket": hit.bucket,
                           "module": hit.module_name, "path": str(hit.path), "stale": list(hit.stale)}
        return out

    # -- stage 1 ---------------------------------------------------------------------------
    def _check_indexer_inputs(self, q, k, k_scale, weights, ks, ke) -> tuple[torch.device, int, int]:
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
        return dev, n_q, n_kv

    def indexer(self, q, k, k_scale, weights, ks, ke, *, out=None):
        """logits [S, SKV] fp32: k_scale[s] * sum_j weights[t,j] * relu(q[t,j] . k[s]) in [ks[t], ke[t])."""
        dev, n_q, n_kv = self._check_indexer_inputs(q, k, k_scale, weights, ks, ke)
        _check_out("out", out, torch.float32, (n_q, n_kv), dev)
        return self.launcher("indexer", dev, n_q, n_kv)(q, k, k_scale, weights, ks, ke, out=out)

    # -- stages 1 + 2 fused ------------------------------------------------------------------
    def indexer_topk(self, q, k, k_scale, weights, ks, ke, *, out=None):
        """indices [S, k] int32: the k largest indexer logits of each row's window, selected while
        they are computed (the S x SKV logits are never written). Triton backend only."""
        dev, n_q, n_kv = self._check_indexer_inputs(q, k, k_scale, weights, ks, ke)
        _check_out("out", out, torch.int32, (n_q, self.spec.topk.k), dev)
        if self.backend != "triton":
            raise BackendError(f"the fused indexer_topk has a Triton template only (backend={self.backend!r})")
        return self.launcher("indexer_topk", dev, n_q, n_kv)(q, k, k_scale, weights, ks, ke, out=out)

    # -- stage 2 ---------------------------------------------------------------------------
    def topk(self, logits, ks, ke, *, out=None):
        """indices [S, k] int32: the k largest logits of each row's window [ks, ke), then -1 padding."""
        _check("logits", logits, torch.float32, (None, None))
        dev = logits.device
        n_q = logits.shape[0]
        _check("ks", ks, torch.int32, (n_q,), dev)
        _check("ke", ke, torch.int32, (n_q,), dev)
        _check_out("out", out, torch.int32, (n_q, self.spec.topk.k), dev)
        return self.launcher("topk", dev, n_q, logits.shape[1])(logits, ks, ke, out=out)

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
        return self.launcher("sparse_attention", dev, n_q, kv.shape[0])(
            q, kv, indices, at.softmax_scale if sm_scale is None else float(sm_scale), out=out, lse=lse)

    # -- all three -------------------------------------------------------------------------
    def dsa(self, q, kv, index_q, index_k, index_k_scale, index_weights, ks, ke,
            sm_scale: float | None = None) -> DSAOutput:
        """Indexer -> top-k -> sparse attention for one flattened batch of S query tokens."""
        if isinstance(q, torch.Tensor) and isinstance(index_q, torch.Tensor) and q.shape[0] != index_q.shape[0]:
            raise ValueError(f"q has {q.shape[0]} tokens but index_q has {index_q.shape[0]}")
        if isinstance(kv, torch.Tensor) and isinstance(index_k, torch.Tensor) and kv.shape[0] != index_k.shape[0]:
            raise ValueError(f"kv has {kv.shape[0]} rows but index_k has {index_k.shape[0]}")
        if self.spec.topk.fused and self.backend == "triton":
            indices = self.indexer_topk(index_q, index_k, index_k_scale, index_weights, ks, ke)
        else:
            logits = self.indexer(index_q, index_k, index_k_scale, index_weights, ks, ke)
            indices = self.topk(logits, ks, ke)
        out, lse = self.sparse_attention(q, kv, indices, sm_scale)
        return DSAOutput(out, lse, indices)


def detected_gpu() -> tuple[str, str] | None:
    """(GPU type, compute capability) of cuda:0, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return gpu_type_from_device_name(torch.cuda.get_device_name(0)), f"{major}.{minor}"


TARGETS = {"triton": ("cuda", "cpu"), "tvm": ("llvm", "cuda")}


def build(spec: Spec, backend: str = "triton", gpu: str | None = None,
          schedules: Mapping[str, Mapping[str, int]] | None = None, use_db: bool = True,
          target: str | None = None) -> DSAKernels:
    """The three kernels of `spec` for `backend`, generated (or fetched from the cache) on first use.

    target: None follows each call's tensors (CUDA tensors -> GPU kernels; CPU tensors -> the Triton
    interpreter or TVM's llvm kernels); "llvm"/"cuda" (TVM) or "cuda"/"cpu" (Triton) accept only
    tensors of that target and say so otherwise.
    gpu: the GPU type whose tuning database and limits to use (default: the one torch sees).
    schedules: optional {kernel: {knob: value}} overriding the tuning database and the spec's pins.
    use_db: False ignores the tuning database (pinned knobs and defaults only).
    """
    backends.check_backend(backend)
    if target is not None and target not in TARGETS[backend]:
        raise ValueError(f"target={target!r} for backend={backend!r}: allowed {', '.join(TARGETS[backend])} "
                         "or None (follow the tensors)")
    if backend == "tvm" and (problem := tvm_backend.available()):
        raise BackendError(problem)
    detected = detected_gpu()
    if gpu is not None:
        get_gpu(gpu)  # a named GPU type must be one dsagen knows
        cc = detected[1] if detected and detected[0] == gpu else None
        gpu_type, capability = gpu, cc
    elif detected is not None:
        gpu_type, capability = detected
        if gpu_type not in GPUS:
            log.warning("dsagen: GPU %r is not in dsagen's table; limits of %s are used for legality",
                        gpu_type, DEFAULT_GPU)
    else:
        gpu_type, capability = None, None
    return DSAKernels(spec, backend, gpu_type, capability, schedules, use_db, target)
