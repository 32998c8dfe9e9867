"""Generated sources on disk: each module written once into the cache and imported from there,
whatever the backend.

A file's name spells out its specialization plus a content key; writers take a file lock and
publish with an atomic rename, so a reader never sees a half-written file, and a file whose text
differs from the source (truncated, edited) is rewritten.
"""
from __future__ import annotations

import contextlib
import types
from pathlib import Path

from ..codegen import GeneratedSource
from ..errors import BackendError
from .. import fileio
from ..fileio import atomic_write_text, cache_dir, file_lock


def _is_current(path: Path, source: str) -> bool:
    try:
        return path.read_text() == source
    except OSError:
        return False


def materialize(gen: GeneratedSource, directory: Path | None = None) -> Path:
    """The module's file in the cache, written if missing or different; safe across processes."""
    directory = directory or cache_dir() / gen.backend
    path = directory / f"{gen.module_name}.py"
    if _is_current(path, gen.source):  # cache hit: no lock needed
        return path
    with file_lock(directory / f".{gen.module_name}.lock"):
        if not _is_current(path, gen.source):
            atomic_write_text(path, gen.source)
    return path


def import_file(path: Path, name: str, context=contextlib.nullcontext) -> types.ModuleType:
    """Import a generated module file as `name` (executed inside `context()`); a module that fails
    to import is removed again and reported as a BackendError naming the file."""
    try:
        return fileio.import_file(path, name, context)
    except Exception as exc:
        raise BackendError(f"generated module {path} failed to import: {exc}") from exc
