"""The op registry (dsagen/ops/registry.py) and dsagen's own ops.

Importing this package imports every op module in it (all but the helper modules, the
`*_workload` modules and names starting with `_`) and registers the ops each declares at module
level, so an in-tree kernel is its op module, its workload module, templates and schedule files,
with no list to edit. Listings follow each op's declared `position`, not the order modules import
in. A kernel kept outside dsagen is written the same way and registered with `load_plugin(path)`,
`register(op)`, the `DSAGEN_OPS` environment variable (importable module names or paths of `.py`
files, separated by commas) or the `dsagen.ops` entry-point group of an installed package.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import Op
from .registry import (PLUGINS_ENV, all_ops, as_op, collect, enabled, get_op, load_plugin, names, own_ops, register,
                       semantic_hash, stages, unregister)

# the modules of this package that hold no op: the parts every op is written with
HELPERS = frozenset({"base", "checks", "registry", "shared", "signature", "workload"})


def _own_modules() -> list[str]:
    """The modules of this package that define ops, by name."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if m.name not in HELPERS and not m.name.startswith("_") and not m.name.endswith("_workload"))


def _register_own_ops() -> None:
    """Import every op module of this package and register the ops it declares."""
    for module in _own_modules():
        collect(importlib.import_module(f"{__name__}.{module}"))


_register_own_ops()

__all__ = ["Op", "PLUGINS_ENV", "all_ops", "as_op", "enabled", "get_op", "load_plugin", "names", "own_ops",
           "register", "semantic_hash", "stages", "unregister"]
