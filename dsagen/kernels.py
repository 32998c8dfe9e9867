"""Run: `dsagen.build(spec)` -> an object whose .indexer/.topk/.sparse_attention/.dsa take tensors.

Step 6 of the pipeline. Every argument is checked (dtype, shape, device, strides) by the kernel's
op before anything launches, and a bad one raises ValueError naming it. Each call goes through a
registered torch.library op (dsagen::<kernel>), so `torch.compile(fullgraph=True)` traces it as one
node and CUDA graphs capture it; the schedule is resolved, and the module written and imported,
when the op first runs eagerly for a shape bucket (`prepare()` does it ahead of time), never while
tracing. CUDA tensors run the compiled kernels; CPU tensors run the interpreted Triton rendering
or TVM's llvm kernels.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping, NamedTuple

import torch

from . import backends
from .backends import tvm as tvm_backend
from .backends.source_cache import materialize
from .errors import BackendError
from .ops import enabled as enabled_ops, get_op, names as op_names
from .resolve import Resolved, Resolver, gpu_context
from .spec import Spec
from . import autograd, torch_ops


class DecodeOutput(NamedTuple):
    out: torch.Tensor  # [B, s_q, H, Dv] bf16
    lse: torch.Tensor  # [B, s_q, H] fp32, natural log, +inf where no slot was valid
    slots: torch.Tensor  # [B, s_q, k] int32 cache slots attended (-1 padded)


class DSAOutput(NamedTuple):
    out: torch.Tensor  # [S, H, Dv] bf16
    lse: torch.Tensor  # [S, H] fp32, natural log, +inf where no index was valid
    indices: torch.Tensor  # [S, k] int32, -1 padded


def _refuse_grad(kernel: str, args, in_place: bool) -> None:
    """An input that requires grad would silently lose its graph where there is no backward: a
    kernel without one, or output buffers written in place (outside autograd)."""
    if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return
    if in_place:
        raise RuntimeError(f"dsagen.{kernel}: an input requires grad, but output buffers given by keyword are "
                           "written in place, outside autograd, so there is no backward through them; leave the "
                           "buffers out (the outputs are then differentiable where the kernel has a backward), "
                           "or call it under torch.no_grad()")
    if not autograd.differentiable(kernel):
        hint = get_op(kernel).no_backward_hint
        hint = f" ({hint})" if hint else ""
        raise RuntimeError(
            f"dsagen.{kernel}: an input requires grad, but this kernel has no backward pass, so the result "
            f"would silently carry no gradient{hint}; call it under torch.no_grad() or on detached tensors "
            "(.detach())")


TARGETS = {"triton": ("cuda", "cpu"), "tvm": ("llvm", "cuda")}


class DSAKernels:
    """The kernels of one spec on one backend, and their composition `dsa()`.

    The schedule of each kernel is resolved per shape bucket at the first call that has it (see
    dsagen.resolve: override -> tuning database -> the spec's pinned knobs -> defaults ->
    nearest legal point); `explain()` says which.
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
        self.handle = torch_ops.register_build(self)

    # -- schedules and modules --------------------------------------------------------------
    @property
    def deterministic(self) -> bool:
        """Whether this is a batch-invariant build (build(deterministic=True))."""
        return self.resolver.batch_invariant

    @property
    def plan_gpu(self):
        return self.resolver.plan_gpu

    def kernels(self) -> list[str]:
        """The kernels this build offers (every registered op with a template for its backend)."""
        return [op.name for op in enabled_ops(self.spec, self.backend)]

    def resolve(self, kernel: str, S: int | None = None, SKV: int | None = None,
                device_type: str = "cuda") -> Resolved:
        """The schedule and module `kernel` uses for a problem of S queries and SKV keys."""
        return self.resolver.resolve(kernel, S, SKV, device_type)

    def path(self, resolved: Resolved) -> Path:
        """The resolved module's file in the cache (written once)."""
        name = resolved.module_name
        if name not in self._paths:
            self._paths[name] = materialize(resolved.generated)
        return self._paths[name]

    def launcher(self, kernel: str, device: torch.device, S: int | None = None, SKV: int | None = None):
        """The generated launcher for a device: compiled for CUDA, interpreted (or llvm) for CPU."""
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("CUDA tensors were given but torch sees no CUDA device")
        want = "cuda" if device.type == "cuda" else ("llvm" if self.backend == "tvm" else "cpu")
        if self.target is not None and self.target != want:
            raise ValueError(f"these kernels were built with target={self.target!r} but got {device.type} tensors")
        hit = self.resolve(kernel, S, SKV, device.type)
        return backends.launcher(self.backend, self.path(hit), kernel, device.type)

    def prepare(self, S: int, SKV: int, device: str | torch.device = "cuda") -> dict[str, str]:
        """Resolve, write and import every kernel for (S, SKV) on `device` now (before a CUDA-graph
        capture or a compiled region's first call); returns kernel -> module name."""
        dev = torch.device(device)
        out = {}
        for kernel in self.kernels():
            self.launcher(kernel, dev, S, SKV)
            out[kernel] = self.resolve(kernel, S, SKV, dev.type).module_name
        return out

    def explain(self, S: int | None = None, SKV: int | None = None, device_type: str = "cuda") -> dict[str, dict]:
        """Per kernel: schedule, where it came from, bucket and module, for a problem of (S, SKV)."""
        out = {}
        for kernel in self.kernels():
            hit = self.resolve(kernel, S, SKV, device_type)
            out[kernel] = {"schedule": hit.point, "source": hit.source, "bucket": hit.bucket,
                           "module": hit.module_name, "stale": list(hit.stale)}
        return out

    # -- calls ------------------------------------------------------------------------------
    def run(self, kernel: str, *args, **outs):
        """Check the arguments, then run `kernel` (through its torch.library op unless output
        buffers are given, which are written in place)."""
        op = get_op(kernel)
        problem = op.unavailable(self.spec, self.backend)
        if problem:
            raise BackendError(problem)
        call = op.check_args(self.spec, *args, **outs)
        _refuse_grad(kernel, args, any(v is not None for v in outs.values()))
        args, outs = op.launch_args(self.spec, args, outs)
        if any(v is not None for v in outs.values()):
            return self.launch(kernel, args, outs, call)
        return torch_ops.call(kernel, args, self.handle)

    def launch(self, kernel: str, args: tuple, outs: dict | None = None, call=None):
        """Run the generated launcher on filled-in arguments (eager; what the op runs). `call`: the
        checked call's device and shape when the caller has it, else the arguments are checked here."""
        outs = {k: v for k, v in (outs or {}).items() if v is not None}
        if call is None:
            call = get_op(kernel).check_args(self.spec, *args, **outs)
        return self.launcher(kernel, call.device, call.S, call.SKV)(*args, **outs)

    def __getattr__(self, name: str):
        """A kernel registered outside dsagen is a method too: kernels.<name>(*args, out=...)."""
        if name.startswith("_") or name not in op_names():
            raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")
        return functools.partial(self.run, name)

    def indexer(self, q, k, k_scale, weights, ks, ke, *, out=None):
        """logits [S, SKV] fp32: k_scale[s] * sum_j weights[t,j] * relu(q[t,j] . k[s]) in [ks[t], ke[t])."""
        return self.run("indexer", q, k, k_scale, weights, ks, ke, out=out)

    def indexer_topk(self, q, k, k_scale, weights, ks, ke, *, out=None):
        """indices [S, k] int32: the k largest indexer logits of each row's window, selected while
        they are computed (the S x SKV logits are never written). Triton backend only."""
        return self.run("indexer_topk", q, k, k_scale, weights, ks, ke, out=out)

    def topk(self, logits, ks, ke, *, out=None):
        """indices [S, k] int32: the k largest logits of each row's window [ks, ke), then -1 padding."""
        return self.run("topk", logits, ks, ke, out=out)

    def sparse_attention(self, q, kv, indices, sm_scale: float | None = None, *, out=None, lse=None):
        """(out [S, H, Dv] bf16, lse [S, H] fp32): softmax over each query's valid selected kv rows.
        sm_scale: None uses the spec's. Differentiable: out carries gradients to q and kv (the
        sparse_attention_bwd kernel); lse carries none."""
        return self.run("sparse_attention", q, kv, indices, sm_scale, out=out, lse=lse)

    def indexer_loss(self, iq, ik, weights, aq, akv, alse, indices, sm_scale: float | None = None):
        """(loss [S] fp32, index_lse [S] fp32): V3.2's indexer training loss per query,
        KL(p || softmax of the indexer logits) over the row's selected keys, where p is the main
        attention's probability mass (aq, akv, alse: its q, kv and lse, read as constants) summed
        over heads and normalized. Differentiable in iq, ik and weights (indexer_loss_bwd). For the
        dense warm-up, pass indices = dsagen.dense_window_indices(ks, ke)."""
        return self.run("indexer_loss", iq, ik, weights, aq, akv, alse, indices, sm_scale)

    # -- decode over the paged caches (specs with a [cache] section) ---------------------------
    def mla_cache_write(self, rows, slot_mapping, cache) -> None:
        """Write bf16 rows [n, qk_dim] into the paged FP8 MLA cache at slot_mapping [n] (page *
        page_size + offset; negative or out-of-range slots are skipped), quantized exactly as
        dsagen.cache_formats.quantize_mla_rows."""
        return self.run("mla_cache_write", rows, slot_mapping, cache)

    def paged_indexer(self, q, index_cache, weights, context_lens, block_table, *, out=None):
        """logits [B * next_n, max_blocks * page_size] fp32 over each request's paged keys; query j
        of request b sees positions < context_lens[b] - next_n + j + 1, -inf elsewhere."""
        return self.run("paged_indexer", q, index_cache, weights, context_lens, block_table, out=out)

    def decode_topk(self, logits, context_lens, block_table, *, out=None):
        """slots [B, next_n, k] int32: the k largest logits of each query row's visible prefix
        (row b * next_n + j sees positions < context_lens[b] - next_n + j + 1; ties to the lower
        position), each turned into its cache slot through block_table, then -1 padding."""
        return self.run("decode_topk", logits, context_lens, block_table, out=out)

    def sparse_decode(self, q, mla_cache, indices, sm_scale: float | None = None, *, out=None, lse=None):
        """(out [B, s_q, H, v_dim] bf16, lse [B, s_q, H] fp32) over the selected cache slots
        [B, s_q, k] (negative or out-of-range: invalid) of the paged FP8 MLA cache."""
        return self.run("sparse_decode", q, mla_cache, indices, sm_scale, out=out, lse=lse)

    def dsa(self, q, kv, index_q, index_k, index_k_scale, index_weights, ks, ke,
            sm_scale: float | None = None) -> DSAOutput:
        """Indexer -> top-k -> sparse attention for one flattened batch of S query tokens (see
        dsagen.varlen for the windows of a batch of sequences)."""
        if isinstance(q, torch.Tensor) and isinstance(index_q, torch.Tensor) and q.shape[0] != index_q.shape[0]:
            raise ValueError(f"q has {q.shape[0]} tokens but index_q has {index_q.shape[0]}")
        if isinstance(kv, torch.Tensor) and isinstance(index_k, torch.Tensor) and kv.shape[0] != index_k.shape[0]:
            raise ValueError(f"kv has {kv.shape[0]} rows but index_k has {index_k.shape[0]}")
        with torch.no_grad():  # the selection is integer-valued: no gradient flows through it
            if self.spec.topk.fused and get_op("indexer_topk").enabled(self.spec, self.backend):
                indices = self.indexer_topk(index_q, index_k, index_k_scale, index_weights, ks, ke)
            else:
                logits = self.indexer(index_q, index_k, index_k_scale, index_weights, ks, ke)
                indices = self.topk(logits, ks, ke)
        out, lse = self.sparse_attention(q, kv, indices, sm_scale)
        return DSAOutput(out, lse, indices)

    def decode(self, q, mla_cache, index_q, index_cache, index_weights, context_lens, block_table,
               sm_scale: float | None = None) -> DecodeOutput:
        """One decode step over the paged caches: paged indexer -> decode top-k of each query's
        visible prefix, emitted as cache slots -> sparse FP8 decode attention. No host
        sync and fixed shapes, so a CUDA graph captures it (call prepare() first).

        q [B, s_q, H, qk_dim] bf16; mla_cache uint8 [pages, page_size, 1, bytes_per_token];
        index_q [B, s_q, Hi, Di] fp8; index_cache uint8 [pages, page_size, 1, Di + 4];
        index_weights [B * s_q, Hi] fp32; context_lens [B] int32 (the new tokens included);
        block_table [B, max_blocks] int32."""
        if self.spec.cache is None:
            raise ValueError("decode() needs a spec with a [cache] section (page size and cache formats)")
        if isinstance(q, torch.Tensor) and isinstance(index_q, torch.Tensor) and q.shape[:2] != index_q.shape[:2]:
            raise ValueError(f"q is [B, s_q] = {list(q.shape[:2])} but index_q is {list(index_q.shape[:2])}")
        logits = self.paged_indexer(index_q, index_cache, index_weights, context_lens, block_table)
        slots = self.decode_topk(logits, context_lens, block_table)
        if isinstance(q, torch.Tensor) and q.dim() == 4:  # with no request the top-k cannot tell s_q
            slots = slots.reshape(q.shape[0], q.shape[1], self.spec.topk.k)
        out, lse = self.sparse_decode(q, mla_cache, slots, sm_scale)
        return DecodeOutput(out, lse, slots)


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
