"""Where Optuna studies live: an embedded journal file by default, or a database URL to share.

The default needs no server: a journal file in the user cache directory, safe for several processes
of one host (`--devices 0,1,...`). A PostgreSQL (or MySQL, SQLite) URL lets workers on many hosts
add trials to one study.

A journal is one JSON record per line, appended under the journal's lock. A process that stops in
the middle of an append (killed, a full disk, a power cut) leaves a torn last record; Optuna reads
past it, but its next append would continue that partial line, and every read after that would
fail, for every study in the file. So a torn last record is set aside (moved to a side file next
to the journal, `<journal>.torn-<time>`) when the journal is opened and before every append, and
a record that cannot be read anywhere else is one error naming the file and the line.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from ..errors import DsagenError
from ..fileio import cache_dir, make_dirs

log = logging.getLogger("dsagen")

_RDB_SCHEMES = ("postgresql", "postgresql+psycopg2", "postgresql+psycopg", "mysql", "mysql+pymysql", "sqlite")


def default_journal() -> Path:
    return cache_dir() / "tuning" / "studies.journal"


def describe(storage: str | None) -> str:
    """The storage as a user should read it (a URL's password hidden)."""
    if storage is None:
        return f"journal file {default_journal()}"
    if "://" in storage:
        scheme, rest = storage.split("://", 1)
        if "@" in rest:
            creds, host = rest.rsplit("@", 1)
            user = creds.split(":", 1)[0]
            return f"{scheme}://{user}:***@{host}"
    return storage


class JournalError(DsagenError, ValueError):
    """A journal of studies that cannot be read: a record other than the last is not JSON."""


def _journal_backend():
    """JournalFileBackend that sets a torn last record aside (made on first use: optuna is imported
    only by the commands that tune)."""
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    class SafeJournalBackend(JournalFileBackend):
        def __init__(self, file_path: str) -> None:
            self._journal_lock = JournalFileSymlinkLock(file_path)  # Optuna's own: <journal>.lock
            super().__init__(file_path, self._journal_lock)  # creates a missing file
            with _holding(self._journal_lock):
                set_aside_torn_tail(Path(file_path))

        def append_logs(self, logs: list[dict]) -> None:
            text = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in logs)
            with _holding(self._journal_lock):  # no other writer now: a torn end is a dead writer's
                set_aside_torn_tail(Path(self._file_path))
                with open(self._file_path, "ab") as f:
                    f.write(text.encode("utf-8"))
                    f.flush()
                    os.fsync(f.fileno())

        def read_logs(self, log_number_from: int):
            try:
                yield from super().read_logs(log_number_from)
            except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError, a line without its end
                raise JournalError(_unreadable(Path(self._file_path), exc)) from None

    return SafeJournalBackend


@contextlib.contextmanager
def _holding(lock):
    """Hold an Optuna journal lock for the with-block."""
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _last_line_start(f, size: int) -> int:
    """Offset of the last line of an open file of `size` bytes (its final newline not counted)."""
    pos, chunk = size - 1, 4096  # a final newline ends the last line; it does not start one
    while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        found = f.read(pos - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        pos, chunk = start, min(chunk * 2, 1 << 20)
    return 0


def _is_record(line: bytes) -> bool:
    """A complete journal record: a line ending in a newline that holds one JSON object."""
    if not line.endswith(b"\n"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _torn_tail(path: Path) -> int | None:
    """Where the journal's torn last record starts, or None when it ends with a complete one."""
    size = path.stat().st_size
    if size == 0:
        return None
    with open(path, "rb") as f:
        start = _last_line_start(f, size)
        f.seek(start)
        return None if _is_record(f.read()) else start


def _side_file(path: Path) -> Path:
    """A new file next to the journal for its torn bytes: <journal>.torn-<time>[-n]."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    side, n = path.with_name(f"{path.name}.torn-{stamp}"), 1
    while side.exists():
        side, n = path.with_name(f"{path.name}.torn-{stamp}-{n}"), n + 1
    return side


def set_aside_torn_tail(path: Path) -> Path | None:
    """Move a torn last record of the journal at `path` to a side file and cut the journal back to
    its complete records; the side file, or None when nothing was torn. The caller holds the
    journal's lock. The torn bytes are written (and synced) before the journal is cut, so a crash
    in between loses nothing: the next open sets the same bytes aside again."""
    start = _torn_tail(path)
    if start is None:
        return None
    with open(path, "rb") as f:
        f.seek(start)
        torn = f.read()
    side = _side_file(path)
    with open(side, "xb") as out:
        out.write(torn)
        out.flush()
        os.fsync(out.fileno())
    with open(path, "r+b") as f:
        f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    log.warning("dsagen: %s: its last record was torn (a process stopped while writing it): moved its %d bytes to "
                "%s; the complete records before it are kept", path, len(torn), side)
    return side


def _unreadable(path: Path, exc: Exception) -> str:
    """One line naming the journal, the first record that cannot be read, and what to do."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not _is_record(line):
                break
        else:
            number = None
    where = f"{path}:{number}" if number is not None else str(path)
    return (f"{where}: not a complete journal record ({exc}), so the studies in this file cannot be read; move "
            f"the file away (its studies start afresh) or pass another --storage")


def open_storage(storage: str | None):
    """An Optuna storage for --storage: None (default journal), a *.journal path, or a database URL."""
    import optuna

    if storage is None or ("://" not in storage):
        path = default_journal() if storage is None else Path(storage)
        if storage is not None and path.suffix != ".journal":
            raise ValueError(f"--storage {storage!r}: give a file ending in .journal or a database URL "
                             f"({', '.join(s + '://...' for s in ('postgresql', 'mysql', 'sqlite'))})")
        make_dirs(path.parent)
        return optuna.storages.JournalStorage(_journal_backend()(str(path)))
    scheme = storage.split("://", 1)[0]
    if scheme not in _RDB_SCHEMES:
        raise ValueError(f"--storage: unsupported URL scheme {scheme!r}: allowed {', '.join(_RDB_SCHEMES)}")
    try:
        return optuna.storages.RDBStorage(storage, engine_kwargs={"pool_pre_ping": True})
    except ImportError as exc:
        raise ValueError(f"--storage {describe(storage)}: the database driver is missing ({exc}); "
                         "install dsagen[postgres]") from None
    except Exception as exc:  # sqlalchemy.exc.OperationalError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--storage {describe(storage)}: cannot connect: {first}") from None
