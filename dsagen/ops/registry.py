"""The op registry: every kernel family dsagen knows, found by name at the API boundary.

An op module declares its op(s) at module level; `collect(module)` registers them, for dsagen's own
modules (dsagen/ops/__init__.py imports every one) and for a kernel kept outside dsagen alike
(`load_plugin`: a module name or a `.py` file; the `DSAGEN_OPS` environment variable and the
`dsagen.ops` entry-point group name them for every process). `register(op)` adds one op directly.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import threading
from pathlib import Path
from types import ModuleType

from ..errors import DsagenError
from ..fileio import import_file
from ..plan import semantic_hash as _semantic_hash
from ..spec import known_kernels
from .base import Op

PLUGINS_ENV = "DSAGEN_OPS"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_REGISTRY: dict[str, Op] = {}
_LOCK = threading.RLock()
_plugins_loaded = False
OWN_PACKAGE = __name__.rsplit(".", 1)[0]  # dsagen.ops


def register(op: Op) -> Op:
    """Add a kernel family; its name must be new (registering the same class again is a no-op)."""
    if not isinstance(op, Op):
        raise TypeError(f"register() takes a dsagen.ops.Op instance, got {type(op).__name__}")
    if not isinstance(op.name, str) or not _NAME.match(op.name):
        raise DsagenError(f"op name {op.name!r} must be lower-case letters, digits and '_' (a letter first)")
    if not isinstance(op.position, int) or isinstance(op.position, bool):
        raise DsagenError(f"op {op.name!r}: position={op.position!r} must be an integer (where it is listed)")
    with _LOCK:
        old = _REGISTRY.get(op.name)
        if old is not None and type(old) is not type(op):
            raise DsagenError(f"op {op.name!r} is already registered (by {type(old).__module__})")
        _REGISTRY[op.name] = op
        _order_by_position()
    return op


def collect(module: ModuleType) -> list[Op]:
    """Register every op a module declares at its top level (instances of Op), in their order."""
    found = [value for value in vars(module).values() if isinstance(value, Op)]
    for op in found:
        register(op)
    return found


def _order_by_position() -> None:
    """Keep the registry in listing order: by position, then by registration (a stable sort)."""
    ordered = sorted(_REGISTRY.values(), key=lambda op: op.position)
    _REGISTRY.clear()
    _REGISTRY.update((op.name, op) for op in ordered)


def unregister(name: str) -> None:
    """Forget a kernel registered from outside dsagen (tests; a plugin being reloaded): its plugin
    file is imported again by the next load_plugin."""
    with _LOCK:
        op = _REGISTRY.pop(name, None)
        module = type(op).__module__ if op is not None else ""
        if module.startswith("dsagen_plugin_"):
            sys.modules.pop(module, None)
            sys.modules.pop(f"{module}_workload", None)


def load_plugin(item: str) -> None:
    """Import one kernel module (a module name or a .py path) and register the ops it declares."""
    if item.endswith(".py") or os.sep in item:
        path = Path(item).expanduser().resolve()
        name = f"dsagen_plugin_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{abs(hash(str(path))) % 10**8}"
        if name in sys.modules:
            collect(sys.modules[name])
            return
        if not path.is_file():
            raise DsagenError(f"{PLUGINS_ENV}: cannot import {path}: no such Python file")
        try:
            module = import_file(path, name)
        except Exception as exc:
            raise DsagenError(f"{PLUGINS_ENV}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(item)
        except ImportError as exc:
            raise DsagenError(f"{PLUGINS_ENV}: cannot import module {item!r}: {exc}") from exc
    collect(module)


def _load_plugins() -> None:
    """Import the plugins once; afterwards a plain flag check (no lock: traced code calls this)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    with _LOCK:
        if _plugins_loaded:
            return
        _plugins_loaded = True
        for item in filter(None, (s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(","))):
            load_plugin(item)
        try:
            from importlib.metadata import entry_points

            for ep in entry_points(group="dsagen.ops"):
                loaded = ep.load()
                if isinstance(loaded, ModuleType):
                    collect(loaded)
                elif isinstance(loaded, Op):
                    register(loaded)
        except Exception as exc:  # a broken third-party package must not take dsagen down
            raise DsagenError(f"an installed 'dsagen.ops' entry point failed to load: {exc}") from exc


def get_op(name: str) -> Op:
    """The registered op `name`; an unknown name is an error listing the known ones."""
    _load_plugins()
    op = _REGISTRY.get(name) if isinstance(name, str) else None
    if op is None:
        raise DsagenError(f"unknown kernel {name!r}: known kernels are {', '.join(names())}")
    return op


def as_op(kernel: str | Op) -> Op:
    """An op given itself or by name (tools and tests name kernels; the run path passes ops)."""
    return kernel if isinstance(kernel, Op) else get_op(kernel)


def all_ops() -> list[Op]:
    """Every registered op in listing order: by position (dsagen's own hold 10..110, the default
    lists after them), then by registration."""
    _load_plugins()
    return list(_REGISTRY.values())


def own_ops() -> list[Op]:
    """dsagen's own ops (the modules of this package), in listing order, without importing plugins."""
    return [op for op in _REGISTRY.values() if type(op).__module__.startswith(OWN_PACKAGE + ".")]


def names() -> tuple[str, ...]:
    return tuple(op.name for op in all_ops())


def stages() -> tuple[str, ...]:
    """The DSA stages in pipeline order: indexer, top-k, sparse attention."""
    return tuple(op.name for op in all_ops() if op.stage)


known_kernels(names)


def enabled(spec, backend: str) -> list[Op]:
    """The ops a build of `spec` on `backend` offers (what check, generate and show list)."""
    return [op for op in all_ops() if op.enabled(spec, backend)]


def semantic_hash(spec, kernel: str | Op | None = None) -> str:
    """The tuning database's key of `spec` for one kernel (the fields its math reads), or, with
    none named, for the three DSA stages together."""
    ops = [get_op(k) for k in stages()] if kernel is None else [as_op(kernel)]
    return _semantic_hash(spec, ops)
