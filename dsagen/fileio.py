"""Files several processes share (generated modules, tuning databases, studies): locks and
all-or-nothing writes, so a crash or a concurrent writer never leaves a half-written file."""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path


def cache_dir() -> Path:
    """$DSAGEN_CACHE_DIR, else $XDG_CACHE_HOME/dsagen, else ~/.cache/dsagen."""
    if os.environ.get("DSAGEN_CACHE_DIR"):
        return Path(os.environ["DSAGEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsagen"


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock on `path` (created if missing), held for the with-block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
