"""Where Optuna studies live: an embedded journal file by default, or a database URL to share.

The default needs no server: a journal file in the user cache directory, safe for several processes
of one host (`--devices 0,1,...`). A PostgreSQL (or MySQL, SQLite) URL lets workers on many hosts
add trials to one study.
"""
from __future__ import annotations

from pathlib import Path

from ..fileio import cache_dir, make_dirs

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


def open_storage(storage: str | None):
    """An Optuna storage for --storage: None (default journal), a *.journal path, or a database URL."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if storage is None or ("://" not in storage):
        path = default_journal() if storage is None else Path(storage)
        if storage is not None and path.suffix != ".journal":
            raise ValueError(f"--storage {storage!r}: give a file ending in .journal or a database URL "
                             f"({', '.join(s + '://...' for s in ('postgresql', 'mysql', 'sqlite'))})")
        make_dirs(path.parent)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
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
