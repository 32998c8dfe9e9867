"""Triton backend: generated module lifecycle (try load -> lock -> write -> load) and AOT compile.

Step 5 of the pipeline. A rendered module is written once into the cache directory under a name
that spells out its specialization plus a content key; concurrent writers take a file lock and
publish with an atomic rename, so a reader never sees a half-written file. The same source is
imported twice when needed: natively (CUDA tensors) and under the Triton interpreter (CPU tensors),
because `@triton.jit` decides between the two when the module is imported.
"""
from __future__ import annotations

import contextlib
import os
import threading
import types
import warnings
from pathlib import Path

from .source_cache import import_file, materialize  # noqa: F401  (materialize: the lifecycle's first step)
from ..errors import BackendError

_IMPORT_LOCK = threading.Lock()
_LOADED: dict[tuple[str, bool], types.ModuleType] = {}


@contextlib.contextmanager
def _interpret_env(interpret: bool):
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _preimport_lazy_triton_modules() -> None:
    """Triton imports gluon lazily at the first launch and asserts there that its helpers match the
    interpret mode triton.language was imported in; import it now, under the environment as it is."""
    import triton.experimental.gluon  # noqa: F401


def load(path: Path, interpret: bool) -> types.ModuleType:
    """Import a generated module file, natively or for the interpreter (cached per process)."""
    key = (str(path), interpret)
    _preimport_lazy_triton_modules()
    with _IMPORT_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        name = f"dsagen_generated.{path.stem}{'__interp' if interpret else ''}"
        module = import_file(path, name, lambda: _interpret_env(interpret))
        _LOADED[key] = module
        return module


_INTERPRETED_HELPERS: dict = {}


@contextlib.contextmanager
def _restored_language_state():
    """Put triton.language back exactly as it was: the interpreter patches its functions and the
    tensor class while it runs nested @jit helpers and does not undo those patches, which would
    break the next native compile in this process."""
    import triton.language as tl

    objects = [tl, tl.core, tl.math, tl.standard, tl.tensor, tl.dtype, tl.core.tensor_descriptor_base]
    saved = [(obj, {k: v for k, v in vars(obj).items() if not k.startswith("__")}) for obj in objects]
    try:
        yield
    finally:
        for obj, before in saved:
            now = {k: v for k, v in vars(obj).items() if not k.startswith("__")}
            for name, value in before.items():  # names the interpreter adds are its own: kept
                if now.get(name) is not value:
                    setattr(obj, name, value)


@contextlib.contextmanager
def _jit_helpers_interpreted():
    """Let an interpreted kernel call triton.language's own @jit helpers (tl.sum, tl.cdiv, ...).

    They were decorated natively when triton was imported without TRITON_INTERPRET, and a native
    JITFunction refuses to be called from Python; for the launch, route such calls through an
    InterpretedFunction of the same source. Without this, CPU tensors could not run on a process
    that also runs CUDA kernels.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__

    def call_interpreted(self, *args, **kwargs):
        helper = _INTERPRETED_HELPERS.get(self.fn)
        if helper is None:
            helper = _INTERPRETED_HELPERS[self.fn] = InterpretedFunction(self.fn)
        return helper(*args, **kwargs)

    with _IMPORT_LOCK, _restored_language_state():
        JITFunction.__call__ = call_interpreted
        try:
            yield
        finally:
            JITFunction.__call__ = original


def interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run dsagen's kernels here, or None.

    numpy 2.4 makes the interpreter fail on loops with a runtime bound ("only 0-dimensional arrays
    can be converted to Python scalars"); dsagen pins numpy<2.4, but an existing environment may not.
    """
    import numpy

    major, minor = (int(x) for x in numpy.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        return (f"the Triton interpreter (CPU tensors) needs numpy < 2.4, found numpy {numpy.__version__}: "
                "pip install 'numpy<2.4'")
    return None


@contextlib.contextmanager
def _numpy_quiet():
    """NaN and inf in the data are values, not mistakes: a GPU computes inf - inf or the max of a
    row of NaN silently, so the interpreter's NumPy must not warn about them either (invalid value,
    overflow, divide by zero, All-NaN slice), for this launch only. A category the caller set to
    "raise" (np.errstate) is left as it is: asking NumPy to raise is asking to know."""
    import numpy

    quiet = {kind: "ignore" for kind, how in numpy.geterr().items() if how in ("warn", "print", "log")}
    with numpy.errstate(**quiet), warnings.catch_warnings():
        if quiet:
            warnings.filterwarnings("ignore", message="All-NaN (slice|axis) encountered", category=RuntimeWarning)
        yield


def launcher(path: Path, name: str, interpret: bool):
    """The generated module's launcher `name`, ready to call with CPU (interpret) or CUDA tensors."""
    if interpret and (problem := interpreter_problem()):
        raise BackendError(problem)
    fn = getattr(load(path, interpret), name)
    if not interpret:
        return fn

    def run_interpreted(*args, **kwargs):
        with _jit_helpers_interpreted(), _numpy_quiet():
            return fn(*args, **kwargs)

    return run_interpreted


def compile_for(module: types.ModuleType, arch: int = 90, aligned_strides: bool = False) -> list:
    """Compile every kernel of the module for sm_<arch> without a GPU; Triton's CompiledKernels.

    Pointers are declared 16-byte aligned, as Triton specializes them at run time for torch's
    allocations. aligned_strides also declares every stride_* argument a multiple of 16, as run
    time does for shapes like V3.2's: the code is then the one a launch on those shapes compiles.
    A Gluon kernel (@gluon.jit) is compiled from a GluonASTSource, as its launches are."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

    def attrs(fn, signature):
        return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
                if kind.startswith("*") or (aligned_strides and name.startswith("stride_"))}

    target = GPUTarget("cuda", arch, 32)
    def source(fn, signature, constexprs):
        kind = GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource
        return kind(fn, signature, constexprs, attrs(fn, signature))

    return [triton.compile(source(fn, signature, constexprs), target=target, options=options)
            for fn, signature, constexprs, options in module.compile_signature()]
