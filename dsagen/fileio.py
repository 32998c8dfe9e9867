"""Files several processes share (generated modules, tuning databases, studies): locks and
all-or-nothing writes, so a crash or a concurrent writer never leaves a half-written file.

Writes keep what the user set up: a symbolic link stays a link (its target is rewritten, still
atomically, in the target's folder) and an existing file keeps its permission bits. When the cache
folder cannot be created or written, the error says so and points at DSAGEN_CACHE_DIR.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import stat
import sys
import threading
import types
from pathlib import Path

from .errors import DsagenError

CACHE_ENV = "DSAGEN_CACHE_DIR"


class CacheDirError(DsagenError, OSError):
    """The cache folder (generated modules, the user's tuning database, locks) cannot be created
    or written. Also an OSError, so code that catches OSError keeps working."""


def cache_dir() -> Path:
    """$DSAGEN_CACHE_DIR, else $XDG_CACHE_HOME/dsagen, else ~/.cache/dsagen."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsagen"


def _inside(path: Path, folder: Path) -> bool:
    path_text, folder_text = os.path.abspath(path), os.path.abspath(folder)
    return path_text == folder_text or path_text.startswith(folder_text.rstrip(os.sep) + os.sep)


@contextlib.contextmanager
def _cache_hint(path: Path):
    """An OSError about a path inside the cache folder becomes a CacheDirError that names the
    folder and says how to choose another; errors about other paths pass through unchanged."""
    try:
        yield
    except CacheDirError:
        raise
    except OSError as exc:
        cache = cache_dir()
        if not _inside(path, cache):
            raise
        culprit = exc.filename if exc.filename is not None else path
        reason = exc.strerror or str(exc) or type(exc).__name__
        if os.environ.get(CACHE_ENV):
            how = f"{CACHE_ENV}={os.environ[CACHE_ENV]} is not usable: set {CACHE_ENV} to a writable folder"
        else:
            how = f"set {CACHE_ENV} to a writable folder"
        raise CacheDirError(f"cannot write to the dsagen cache folder {cache} ({culprit}: {reason}); {how}") from exc


def make_dirs(path: Path) -> Path:
    """Create a folder and its parents (fine if it exists). Inside the cache folder, a failure is
    a CacheDirError that names the folder and points at DSAGEN_CACHE_DIR."""
    path = Path(path)
    with _cache_hint(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock on `path` (created if missing), held for the with-block."""
    path = Path(path)
    with _cache_hint(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def real_path(path: Path) -> Path:
    """The file a write to `path` must replace: symbolic links followed (also one whose target
    does not exist yet), so that the link itself stays."""
    return Path(os.path.realpath(path))


def _open_new(tmp: Path, mode: int | None) -> int:
    """Create `tmp` for writing: with `mode` exactly, or with the umask's default when None."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for attempt in (1, 2):
        try:
            fd = os.open(tmp, flags, 0o666 if mode is None else mode & 0o600)
            break
        except FileExistsError:  # left over by a crashed process that had our pid
            if attempt == 2:
                raise
            tmp.unlink()
    if mode is not None:
        os.fchmod(fd, mode)  # after the umask, and only once the file is ours alone
    return fd


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: all or nothing.

    A symbolic link is followed: its target is replaced (the temporary file sits in the target's
    folder, so the rename stays atomic) and the link stays a link. An existing file keeps its
    permission bits; a new one gets the umask's default, like any file the user creates.
    """
    path = Path(path)
    with _cache_hint(path):
        target = real_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = None
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = _open_new(tmp, mode)
        try:
            with open(fd, "w", encoding="utf-8", closefd=True) as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        _sync_folder(target.parent)


def import_file(path: Path, name: str, context=contextlib.nullcontext) -> types.ModuleType:
    """Import the Python file `path` as the module `name` (executed inside `context()`). It stays in
    sys.modules only if its import succeeds, so a broken file is imported afresh next time; the
    import's own exception reaches the caller, which names the file in its terms."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with context():
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
