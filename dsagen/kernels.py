"""Step 7 of the pipeline, run: `dsagen.build(spec)` -> an object whose kernel methods take tensors.

A kernel's name is turned into its op once, at this boundary: `DSAKernels.kernel(name)` is a
`BoundKernel` (the op, the build's spec and backend, and per shape bucket its resolved schedule
and loaded module) that every later step takes. A call binds its arguments by name from the op's
signature (spec defaults filled in by name), checks every one (dtype, shape, device, strides; a bad
one raises ValueError naming it) before anything launches, and runs through the registered
torch.library op: `dsagen::<kernel>`, or `dsagen::<kernel>_out` when output buffers are given, so
`torch.compile(fullgraph=True)` traces either as one node and CUDA graphs capture it. The schedule
is resolved, and the module written and imported, when the op first runs eagerly for a shape
bucket (`prepare()` does it ahead of time), never while tracing. CUDA tensors run the compiled
kernels; CPU tensors run the interpreted Triton rendering or TVM's llvm kernels.

The build's kernel methods (`kernels.topk(...)`, ...) are generated from the op signatures, and
the compositions `dsa()` and `decode()` are pipelines declared as data (dsagen/pipelines.py).
"""
from __future__ import annotations

import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from . import backends
from .backends import tvm as tvm_backend
from .backends.source_cache import materialize
from .codegen import GeneratedSource, generate
from .errors import BackendError
from .ops import Op, enabled as enabled_ops, get_op, own_ops
from .pipelines import DECODE, DSA, run_pipeline
from .resolve import DEFAULT_GPU, Resolved, Resolver, gpu_context
from .spec import Spec
from . import torch_ops


class DecodeOutput(NamedTuple):
    out: torch.Tensor  # [B, s_q, H, Dv] bf16
    lse: torch.Tensor  # [B, s_q, H] fp32, natural log, +inf where no slot was valid
    slots: torch.Tensor  # [B, s_q, k] int32 cache slots attended (-1 padded)


class DSAOutput(NamedTuple):
    out: torch.Tensor  # [S, H, Dv] bf16
    lse: torch.Tensor  # [S, H] fp32, natural log, +inf where no index was valid
    indices: torch.Tensor  # [S, k] int32, -1 padded


@dataclass(frozen=True)
class ResolvedModule:
    """A resolved schedule (dsagen.resolve.Resolved: point, source, bucket) and the module's source
    it renders to: what `resolve()`, `explain()` and the CLI report."""

    schedule: Resolved
    generated: GeneratedSource

    kernel = property(lambda self: self.schedule.kernel)
    point = property(lambda self: self.schedule.point)
    variant = property(lambda self: self.schedule.variant)
    source = property(lambda self: self.schedule.source)
    bucket = property(lambda self: self.schedule.bucket)
    device_type = property(lambda self: self.schedule.device_type)
    stale = property(lambda self: self.schedule.stale)

    @property
    def module_name(self) -> str:
        return self.generated.module_name


TARGETS = {"triton": ("cuda", "cpu"), "tvm": ("llvm", "cuda")}


class BoundKernel:
    """One kernel of one build: its op, the build's spec and backend, and per shape bucket the
    resolved schedule and module. Calling it runs the kernel (the build's method does)."""

    def __init__(self, build: "DSAKernels", op: Op):
        self.build, self.op, self.name = build, op, op.name
        self.spec, self.backend = build.spec, build.backend
        self.signature = op.signature
        self._modules: dict[tuple, ResolvedModule] = {}
        self._lock = threading.Lock()
        self._unavailable = op.unavailable(build.spec, build.backend)  # spec and backend are fixed

    # -- schedules and modules --------------------------------------------------------------
    def resolve(self, S: int | None = None, SKV: int | None = None, device_type: str = "cuda") -> ResolvedModule:
        """The schedule and module this kernel uses for a problem of S queries and SKV keys."""
        schedule = self.build.resolver.resolve(self.op, S, SKV, device_type)
        key = (schedule.bucket, device_type, schedule.variant, tuple(schedule.point.items()))
        with self._lock:
            hit = self._modules.get(key)
            if hit is None:
                hit = self._modules[key] = ResolvedModule(schedule, generate(self.spec, self.op, schedule,
                                                                             self.backend))
        return hit

    def launcher(self, device: torch.device, S: int | None = None, SKV: int | None = None):
        """The generated launcher for a device: compiled for CUDA, interpreted (or llvm) for CPU."""
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("CUDA tensors were given but torch sees no CUDA device")
        want = "cuda" if device.type == "cuda" else ("llvm" if self.backend == "tvm" else "cpu")
        target = self.build.target
        if target is not None and target != want:
            raise ValueError(f"these kernels were built with target={target!r} but got {device.type} tensors")
        hit = self.resolve(S, SKV, device.type)
        return backends.launcher(self.backend, self.build.path(hit), self.name, device.type)

    # -- calls ------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """Bind and check the arguments, then run through dsagen::<kernel> (or, with output buffers,
        dsagen::<kernel>_out, which writes them in place)."""
        if self._unavailable:
            raise BackendError(self._unavailable)
        bound = self.signature.bind(self.name, args, kwargs)
        inputs, given = self.signature.inputs(bound), self.signature.given_buffers(bound)
        self.op.check_args(self.spec, **inputs, **given)
        self._refuse_grad(inputs, bool(given))
        filled = self.signature.fill(self.spec, inputs)
        values = tuple(filled.values())
        if not given:
            return torch_ops.call(self.name, values, self.build.handle)
        returned = self._returned_buffers(filled, given)
        extra = tuple(given.get(b) for b in self.signature.extra_outputs)
        torch_ops.call_out(self.name, values, returned + extra, self.build.handle)
        return returned[0] if len(returned) == 1 else returned

    def _returned_buffers(self, filled: Mapping[str, Any], given: Mapping[str, Any]) -> tuple:
        """Every returned output's buffer: the caller's, else one allocated like the kernel's own."""
        missing = [b for b in self.signature.returns if b not in given]
        made = {}
        if missing:
            fresh = self.op.fake(self.spec, **filled)
            fresh = fresh if isinstance(fresh, tuple) else (fresh,)
            made = dict(zip(self.signature.returns, fresh))
        return tuple(given.get(b, made.get(b)) for b in self.signature.returns)

    def _refuse_grad(self, inputs: Mapping[str, Any], in_place: bool) -> None:
        """An input that requires grad would silently lose its graph where there is no backward: a
        kernel without one, or output buffers written in place (outside autograd)."""
        if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad
                                                  for a in inputs.values()):
            return
        kernel = self.name
        if in_place:
            raise RuntimeError(f"dsagen.{kernel}: an input requires grad, but output buffers given by keyword are "
                               "written in place, outside autograd, so there is no backward through them; leave the "
                               "buffers out (the outputs are then differentiable where the kernel has a backward), "
                               "or call it under torch.no_grad()")
        if not self.op.gradient.differentiable:
            hint = self.op.gradient.hint
            hint = f" ({hint})" if hint else ""
            raise RuntimeError(
                f"dsagen.{kernel}: an input requires grad, but this kernel has no backward pass, so the result "
                f"would silently carry no gradient{hint}; call it under torch.no_grad() or on detached tensors "
                "(.detach())")

    def launch(self, inputs: Mapping[str, Any], buffers: Mapping[str, Any] | None = None):
        """Run the generated launcher eagerly on filled-in inputs (by name) and the given buffers:
        what the torch ops run. The arguments are checked again here (their device and shape pick
        the schedule)."""
        buffers = {k: v for k, v in (buffers or {}).items() if v is not None}
        call = self.op.check_args(self.spec, **inputs, **buffers)
        return self.launcher(call.device, call.S, call.SKV)(*inputs.values(), **buffers)


def _kernel_method(op: Op):
    """A build method for `op`: its signature and docstring, calling the build's bound kernel."""
    name = op.name

    def method(self, *args, **kwargs):
        return self.kernel(name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = op.doc or op.summary
    method.__signature__ = op.signature.method()
    return method


class DSAKernels:
    """The kernels of one spec on one backend, and their compositions `dsa()` and `decode()`.

    Every registered kernel is a method (generated from its op's signature: help(kernels.topk)
    shows its parameters). The schedule of each kernel is resolved per shape bucket at the first
    call that has it (see dsagen.resolve: override -> tuning database -> the spec's pinned knobs ->
    defaults -> nearest legal point); `explain()` says which.
    """

    def __init__(self, spec: Spec, backend: str = "triton", gpu_type: str | None = None,
                 compute_capability: str | None = None,
                 overrides: Mapping[str, Mapping[str, int]] | None = None, use_db: bool = True,
                 target: str | None = None, deterministic: bool = False):
        self.spec = spec
        self.backend = backend
        self.target = target  # None: follow the tensors' device
        self.resolver = Resolver(spec, backend, gpu_type, compute_capability, overrides, use_db,
                                 batch_invariant=deterministic)
        self.gpu_type = gpu_type
        self._paths: dict[str, Path] = {}
        # bound now (not while a call is traced): every kernel this build offers
        self._bound: dict[str, BoundKernel] = {op.name: BoundKernel(self, op) for op in self.ops()}
        self.handle = torch_ops.register_build(self)

    # -- the API boundary: a name becomes its bound kernel, once --------------------------------
    def kernel(self, name: str) -> BoundKernel:
        """The bound kernel `name` (an unknown name is an error listing the known ones)."""
        bound = self._bound.get(name)
        if bound is None:
            bound = self._bound.setdefault(name, BoundKernel(self, get_op(name)))
        return bound

    def ops(self) -> list[Op]:
        """The ops this build offers (every registered op with a template for its backend)."""
        return enabled_ops(self.spec, self.backend)

    def kernels(self) -> list[str]:
        """The kernels this build offers (every registered op with a template for its backend)."""
        return [op.name for op in self.ops()]

    # -- schedules and modules --------------------------------------------------------------
    @property
    def deterministic(self) -> bool:
        """Whether this is a batch-invariant build (build(deterministic=True))."""
        return self.resolver.batch_invariant

    @property
    def plan_gpu(self):
        return self.resolver.plan_gpu

    def resolve(self, kernel: str, S: int | None = None, SKV: int | None = None,
                device_type: str = "cuda") -> ResolvedModule:
        """The schedule and module `kernel` uses for a problem of S queries and SKV keys."""
        return self.kernel(kernel).resolve(S, SKV, device_type)

    def path(self, resolved: ResolvedModule) -> Path:
        """The resolved module's file in the cache (written once)."""
        name = resolved.module_name
        if name not in self._paths:
            self._paths[name] = materialize(resolved.generated)
        return self._paths[name]

    def launcher(self, kernel: str, device: torch.device, S: int | None = None, SKV: int | None = None):
        """The generated launcher for a device: compiled for CUDA, interpreted (or llvm) for CPU."""
        return self.kernel(kernel).launcher(device, S, SKV)

    def prepare(self, S: int, SKV: int, device: str | torch.device = "cuda") -> dict[str, str]:
        """Resolve, write and import every kernel for (S, SKV) on `device` now (before a CUDA-graph
        capture or a compiled region's first call); returns kernel -> module name."""
        dev = torch.device(device)
        out = {}
        for kernel in self.kernels():
            bound = self.kernel(kernel)
            bound.launcher(dev, S, SKV)
            out[kernel] = bound.resolve(S, SKV, dev.type).module_name
        return out

    def explain(self, S: int | None = None, SKV: int | None = None, device_type: str = "cuda") -> dict[str, dict]:
        """Per kernel: schedule, where it came from, bucket and module, for a problem of (S, SKV)."""
        out = {}
        for kernel in self.kernels():
            hit = self.resolve(kernel, S, SKV, device_type)
            out[kernel] = {"schedule": hit.point, "variant": hit.variant, "source": hit.source, "bucket": hit.bucket,
                           "module": hit.module_name, "stale": list(hit.stale)}
        return out

    # -- calls ------------------------------------------------------------------------------
    def run(self, kernel: str, *args, **kwargs):
        """Run `kernel` by name: what its method does (arguments bound by name and checked, output
        buffers given by keyword written in place)."""
        return self.kernel(kernel)(*args, **kwargs)

    def launch(self, kernel: str, args: tuple, outs: dict | None = None, call=None):
        """Run the generated launcher eagerly on filled-in arguments (in signature order) and output
        buffers: what the torch ops run, and what `dsagen bench` times (no dispatch in between)."""
        bound = self.kernel(kernel)
        return bound.launch(dict(zip(bound.signature.names, args)), outs)

    def __getattr__(self, name: str):
        """A kernel registered after dsagen was imported (outside dsagen) is a method too."""
        if name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")
        try:
            op = get_op(name)
        except Exception:
            raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}") from None
        return types.MethodType(_kernel_method(op), self)

    # -- compositions -------------------------------------------------------------------------
    def dsa(self, q, kv, index_q, index_k, index_k_scale, index_weights, ks, ke,
            sm_scale: float | None = None, attn_sink: torch.Tensor | None = None) -> DSAOutput:
        """Indexer -> top-k -> sparse attention for one flattened batch of S query tokens (see
        dsagen.varlen for the windows of a batch of sequences). attn_sink [H] fp32: required when
        the spec has attention.sink = true (out *= 1 / (1 + exp(sink - lse)), lse unchanged), refused
        otherwise."""
        self._check_sink(attn_sink)
        if isinstance(q, torch.Tensor) and isinstance(index_q, torch.Tensor) and q.shape[0] != index_q.shape[0]:
            raise ValueError(f"q has {q.shape[0]} tokens but index_q has {index_q.shape[0]}")
        if isinstance(kv, torch.Tensor) and isinstance(index_k, torch.Tensor) and kv.shape[0] != index_k.shape[0]:
            raise ValueError(f"kv has {kv.shape[0]} rows but index_k has {index_k.shape[0]}")
        values = dict(q=q, kv=kv, index_q=index_q, index_k=index_k, index_k_scale=index_k_scale,
                      index_weights=index_weights, ks=ks, ke=ke, sm_scale=sm_scale, attn_sink=attn_sink)
        return DSAOutput(*run_pipeline(self, DSA, values))

    def _check_sink(self, attn_sink) -> None:
        """The spec says whether the model has a sink per head; a pipeline call follows it."""
        if self.spec.attention.sink and attn_sink is None:
            raise ValueError(f"attn_sink is required: spec {self.spec.name!r} has attention.sink = true "
                             f"(a [{self.spec.attention.heads}] fp32 tensor, one sink per head)")
        if not self.spec.attention.sink and attn_sink is not None:
            raise ValueError(f"attn_sink was given, but spec {self.spec.name!r} has no sink (attention.sink = false)")

    def _check_window(self, q, window_cache, window_indices, window_lengths) -> None:
        """cache.window > 0: the window cache and its indices [B, s_q, window] come with every step;
        without a window in the spec they are refused."""
        window = self.spec.cache.window
        given = [name for name, t in (("window_cache", window_cache), ("window_indices", window_indices),
                                      ("window_lengths", window_lengths)) if t is not None]
        if not window:
            if given:
                raise ValueError(f"{given[0]} was given, but spec {self.spec.name!r} has no window cache "
                                 "(cache.window = 0)")
            return
        if window_cache is None or window_indices is None:
            missing = "window_cache" if window_cache is None else "window_indices"
            raise ValueError(f"{missing} is required: spec {self.spec.name!r} has cache.window = {window} "
                             f"(the window cache and its slots [B, s_q, {window}] int32)")
        if isinstance(q, torch.Tensor) and isinstance(window_indices, torch.Tensor) and (
                window_indices.dim() != 3 or tuple(window_indices.shape) != (*q.shape[:2], window)):
            raise ValueError(f"window_indices must have shape [B, s_q, window] = {[*q.shape[:2], window]}, "
                             f"got {list(window_indices.shape)}")

    def decode(self, q, mla_cache, index_q, index_cache, index_weights, context_lens, block_table,
               sm_scale: float | None = None, attn_sink: torch.Tensor | None = None,
               window_cache: torch.Tensor | None = None, window_indices: torch.Tensor | None = None,
               window_lengths: torch.Tensor | None = None) -> DecodeOutput:
        """One decode step over the paged caches: paged indexer -> decode top-k of each query's
        visible prefix, emitted as cache slots -> sparse FP8 decode attention. No host
        sync and fixed shapes, so a CUDA graph captures it (call prepare() first).

        q [B, s_q, H, qk_dim] bf16; mla_cache uint8 [pages, page_size, 1, bytes_per_token];
        index_q [B, s_q, Hi, Di] fp8; index_cache uint8 [pages, page_size, 1, Di + 4];
        index_weights [B * s_q, Hi] fp32; context_lens [B] int32 (the new tokens included);
        block_table [B, max_blocks] int32.

        DeepSeek-V4 (the spec says which): attn_sink [H] fp32 when attention.sink = true; with
        cache.window = W, window_cache (the sliding-window cache, its own pages, the same format)
        and window_indices [B, s_q, W] int32 (its slots; negative or out of range: invalid), with
        window_lengths [B] int32 optional (request b attends its first window_lengths[b] of them):
        attended in the same softmax as the selected slots."""
        if self.spec.cache is None:
            raise ValueError("decode() needs a spec with a [cache] section (page size and cache formats)")
        self._check_sink(attn_sink)
        self._check_window(q, window_cache, window_indices, window_lengths)
        if isinstance(q, torch.Tensor) and isinstance(index_q, torch.Tensor) and q.shape[:2] != index_q.shape[:2]:
            raise ValueError(f"q is [B, s_q] = {list(q.shape[:2])} but index_q is {list(index_q.shape[:2])}")
        values = dict(q=q, mla_cache=mla_cache, index_q=index_q, index_cache=index_cache,
                      index_weights=index_weights, context_lens=context_lens, block_table=block_table,
                      sm_scale=sm_scale, attn_sink=attn_sink, topk_length=None, window_cache=window_cache,
                      window_indices=window_indices, window_lengths=window_lengths)
        return DecodeOutput(*run_pipeline(self, DECODE, values))


def _install_kernel_methods() -> None:
    """dsagen's own kernels as methods of DSAKernels, generated from their signatures."""
    for op in own_ops():
        if not hasattr(DSAKernels, op.name):
            setattr(DSAKernels, op.name, _kernel_method(op))


_install_kernel_methods()


def build(spec: Spec, backend: str = "triton", gpu: str | None = None,
          schedules: Mapping[str, Mapping[str, int]] | None = None, use_db: bool = True,
          target: str | None = None, deterministic: bool = False) -> DSAKernels:
    """The kernels of `spec` for `backend`, generated (or fetched from the cache) on first use.

    target: None follows each call's tensors (CUDA tensors -> GPU kernels; CPU tensors -> the Triton
    interpreter or TVM's llvm kernels); "llvm"/"cuda" (TVM) or "cuda"/"cpu" (Triton) accept only
    tensors of that target and say so otherwise.
    gpu: the GPU type whose tuning database and limits to use (default: the one torch sees).
    schedules: optional {kernel: {knob: value}} overriding the tuning database and the spec's pins.
    use_db: False ignores the tuning database (pinned knobs and defaults only).
    deterministic: a batch-invariant build: every call of a kernel runs the schedule resolved at
    that kernel's canonical shape (not the call's own shape bucket) and the decode top-k emits each
    row's slots in ascending position order, so a row's logits, indices and outputs are bitwise
    the same on every rerun and whatever else is in the batch (ties in top-k go to the lower
    position in every build).
    """
    backends.check_backend(backend)
    if target is not None and target not in TARGETS[backend]:
        raise ValueError(f"target={target!r} for backend={backend!r}: allowed {', '.join(TARGETS[backend])} "
                         "or None (follow the tensors)")
    if backend == "tvm" and (problem := tvm_backend.available()):
        raise BackendError(problem)
    gpu_type, capability = gpu_context(gpu)
    return DSAKernels(spec, backend, gpu_type, capability, schedules, use_db, target, deterministic)


def resolve_kernel(spec: Spec, kernel: str, backend: str = "triton", gpu: str | None = DEFAULT_GPU,
                   override: Mapping[str, int] | None = None, S: int | None = None, SKV: int | None = None,
                   device_type: str = "cuda", use_db: bool = True) -> ResolvedModule:
    """One kernel's schedule and module without a build's torch ops (tools, tests): the same
    resolver, lowering and rendering."""
    resolver = Resolver(spec, backend, gpu, None, {kernel: override} if override is not None else None, use_db)
    op = get_op(kernel)
    schedule = resolver.resolve(op, S, SKV, device_type)
    return ResolvedModule(schedule, generate(spec, op, schedule, backend))
