"""Every registered kernel as a torch.library custom op, `dsagen::<kernel>`.

Why: `torch.compile(fullgraph=True)` then traces a dsagen call as one opaque node (its fake
implementation gives the output shapes), and CUDA graphs capture it like any other op. A build is
named in the call by a short handle string, so one op serves every spec: the handle finds the
build whose schedule and module run it. Each op is defined on first use of its kernel.
"""
from __future__ import annotations

import itertools
import threading
import weakref

import torch

from . import autograd
from .ops import get_op

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
    for name in kernels.kernels():
        define(name)
    return handle


def _build(handle: str):
    kernels = _BUILDS.get(handle)
    if kernels is None:
        raise RuntimeError(f"dsagen: build {handle!r} no longer exists (keep the object dsagen.build returned)")
    return kernels


def define(kernel: str) -> None:
    """Define dsagen::<kernel> (schema, implementation, fake) once per process."""
    with _LOCK:
        if kernel in _DEFINED:
            return
        op = get_op(kernel)
        params = ", ".join(f"{kind} {name}" for name, kind in op.args)
        returns = "Tensor" if len(op.outputs) == 1 else "(" + ", ".join("Tensor" for _ in op.outputs) + ")"
        _LIBRARY.define(f"{kernel}({params}, str build) -> {returns}")

        def implementation(*args):
            *inputs, handle = args
            return _build(handle).launch(kernel, tuple(inputs))

        def fake(*args):
            *inputs, handle = args
            return op.fake(_build(handle).spec, *inputs)

        _LIBRARY.impl(kernel, implementation, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{kernel}", fake, lib=_LIBRARY)
        autograd.register(kernel, _LIBRARY, NAMESPACE, call)
        _DEFINED.add(kernel)


def call(kernel: str, args: tuple, handle: str):
    """Run dsagen::<kernel> on already checked arguments."""
    return getattr(getattr(torch.ops, NAMESPACE), kernel)(*args, handle)
