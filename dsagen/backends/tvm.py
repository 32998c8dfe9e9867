"""TVM backend: import a generated module, compile its kernel per target kind, cache the library.

Step 5 of the pipeline for backend="tvm". A generated module builds its TVMScript kernel with
`build(kind)` ("llvm" for the CPU, "cuda" for NVIDIA GPUs). dsagen keeps each compiled library in
the cache directory next to the module source (<module>.<target>.so, e.g. .llvm-znver4.so, written
under a lock and published by rename), so a second process loads it instead of compiling; if the toolchain cannot export a
shared library, the compiled module stays in memory for the process.
"""
from __future__ import annotations

import logging
import os
import threading
import types
from pathlib import Path

from ..errors import BackendError
from ..fileio import file_lock
from .source_cache import import_file

log = logging.getLogger("dsagen")
_LOCK = threading.RLock()
_LOADED: dict[str, types.ModuleType] = {}
KINDS = ("llvm", "cuda")


def available() -> str | None:
    """None if apache-tvm imports, else why not (shown to the user)."""
    try:
        import tvm  # noqa: F401
    except ImportError as exc:
        return f"the TVM backend needs apache-tvm (pip install 'dsagen[tvm]'): {exc}"
    return None


def load(path: Path) -> types.ModuleType:
    """Import a generated TVM module file once per process, with dsagen's disk-cached loader."""
    problem = available()
    if problem:
        raise BackendError(problem)
    with _LOCK:
        if str(path) in _LOADED:
            return _LOADED[str(path)]
        module = import_file(path, f"dsagen_generated.{path.stem}")
        module._LOADER = _disk_cached_loader(module, path)
        _LOADED[str(path)] = module
        return module


def _disk_cached_loader(module: types.ModuleType, path: Path):
    compiled: dict[str, object] = {}

    def loader(kind: str):
        with _LOCK:
            if kind not in compiled:
                compiled[kind] = _load_or_build(module, path, kind)
            return compiled[kind]

    return loader


def _load_or_build(module: types.ModuleType, path: Path, kind: str):
    import tvm

    if kind not in KINDS:
        raise BackendError(f"TVM target kind {kind!r}: allowed {', '.join(KINDS)}")
    lib = path.with_name(f"{path.stem}.{module.target_tag(kind)}.so")  # e.g. .llvm-znver4.so
    if lib.exists():
        try:
            return tvm.runtime.load_module(str(lib))
        except Exception as exc:  # a truncated or foreign file: rebuild it
            log.warning("dsagen: cannot load %s (%s); rebuilding", lib, exc)
    with file_lock(lib.with_name(f".{lib.name}.lock")):
        if lib.exists():
            try:
                return tvm.runtime.load_module(str(lib))
            except Exception:
                pass
        try:
            built = module.build(kind)
        except Exception as exc:
            raise BackendError(f"TVM could not compile {path.name} for {kind}: {exc}") from exc
        tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp.so")
        try:
            built.export_library(str(tmp))
            os.replace(tmp, lib)
        except Exception as exc:  # no C toolchain to link a shared library: keep it in memory
            log.info("dsagen: not caching %s on disk (%s)", lib.name, exc)
        finally:
            if tmp.exists():
                tmp.unlink()
        return built


def launcher(path: Path, name: str):
    """The generated launcher `name`; it picks llvm or cuda from its tensors' device."""
    return getattr(load(path), name)


def cuda_source(path: Path) -> str:
    """The CUDA C source TVM generates for the module's kernel (sm_90): inspectable without a GPU."""
    module = load(path)
    return module.build("cuda").mod.imports[0].inspect_source()
