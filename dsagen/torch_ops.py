"""Every registered kernel as torch.library custom ops: `dsagen::<kernel>`, and, for a kernel with
outputs, its mutating variant `dsagen::<kernel>_out` that writes caller-given buffers in place.

Why: `torch.compile(fullgraph=True)` then traces a dsagen call as one opaque node (its fake
implementation gives the output shapes; the `_out` op's schema tells it what is written), and
CUDA graphs capture it like any other op; a call with output buffers takes the same route as one
without. Both schemas come from the op's signature. A build is named in the call by a short handle
string, so one op serves every spec: the handle finds the build whose schedule and module run it.
Each op is defined on first use of its kernel.
"""
from __future__ import annotations

import itertools
import threading
import weakref

import torch

from . import autograd

NAMESPACE = "dsagen"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
_DEFINED: set[str] = set()
_BUILDS: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()
_COUNTER = itertools.count()
_LOCK = threading.Lock()


def register_build(kernels) -> str:
    """A handle naming `kernels` (a DSAKernels) in op calls, and define its kernels' ops now, at
    build time (so that tracing never defines anything)."""
    handle = f"b{next(_COUNTER)}"
    _BUILDS[handle] = kernels
    for op in kernels.ops():
        define(op)
    return handle


def _build(handle: str):
    kernels = _BUILDS.get(handle)
    if kernels is None:
        raise RuntimeError(f"dsagen: build {handle!r} no longer exists (keep the object dsagen.build returned)")
    return kernels


def define(op) -> None:
    """Define dsagen::<kernel> (and dsagen::<kernel>_out) once per process: schema, implementation
    (the build's eager launch), fake."""
    with _LOCK:
        if op.name in _DEFINED:
            return
        _define_call(op)
        if op.signature.buffers:
            _define_out(op)
        autograd.register(op, _LIBRARY, NAMESPACE, call)
        _DEFINED.add(op.name)


def _define_call(op) -> None:
    kernel, names = op.name, op.signature.names
    _LIBRARY.define(op.signature.schema(kernel))

    def implementation(*args):
        *values, handle = args
        return _build(handle).kernel(kernel).launch(dict(zip(names, values)))

    def fake(*args):
        *values, handle = args
        return op.fake(_build(handle).spec, **dict(zip(names, values)))

    _LIBRARY.impl(kernel, implementation, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{kernel}", fake, lib=_LIBRARY)


def _define_out(op) -> None:
    kernel, names, buffers = op.name, op.signature.names, op.signature.buffers
    _LIBRARY.define(op.signature.out_schema(kernel))

    def split(args):
        *values, handle = args
        inputs = dict(zip(names, values[:len(names)]))
        given = {b: t for b, t in zip(buffers, values[len(names):]) if t is not None}
        return inputs, given, handle

    def implementation(*args):
        inputs, given, handle = split(args)
        _build(handle).kernel(kernel).launch(inputs, given)

    def fake(*args):
        return None

    _LIBRARY.impl(f"{kernel}_out", implementation, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{kernel}_out", fake, lib=_LIBRARY)


def call(kernel: str, args: tuple, handle: str):
    """Run dsagen::<kernel> on already checked arguments (in signature order)."""
    return getattr(getattr(torch.ops, NAMESPACE), kernel)(*args, handle)


def call_out(kernel: str, args: tuple, buffers: tuple, handle: str) -> None:
    """Run dsagen::<kernel>_out: the arguments, then every output buffer (None: an extra output
    not asked for), written in place."""
    getattr(getattr(torch.ops, NAMESPACE), f"{kernel}_out")(*args, *buffers, handle)
