"""Where the tuning databases live, and reading and writing them safely.

Two folders are searched, the user's (cache_dir()/autotune_db, written by tuning runs) before the
shipped one (autotune_db/ in a checkout, dsagen/_data/autotune_db in the wheel). Every
read-modify-write (record, merge, prune) holds the file's lock and re-reads the file inside it, so
processes writing side by side never drop each other's entries; every write is atomic, so a crash
never leaves half a file, and a file that does not parse is never written over.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..fileio import atomic_write_text, cache_dir, file_lock, real_path
from ..resources import data_dir
from .schema import Entry, TuningDB, TuningDBError, check_gpu_type, dump, is_gpu_type, parse

# ------------------------------------------------------------------------------------------------
# paths


def user_db_dir() -> Path:
    """Where this user's tuning runs record their winners."""
    return cache_dir() / "autotune_db"


def shipped_db_dir() -> Path:
    """The database that ships with dsagen (FileNotFoundError if this install has none)."""
    return data_dir("autotune_db")


def default_dirs() -> list[Path]:
    """The folders searched by default, the user's first (its entries win)."""
    dirs = [user_db_dir()]
    try:
        dirs.append(shipped_db_dir())
    except FileNotFoundError:
        pass
    return dirs


def db_path(gpu_type: str, directory: Path | None = None) -> Path:
    """The file of one GPU type: <directory>/<gpu_type>.json (default: the user's folder)."""
    return Path(directory if directory is not None else user_db_dir()) / f"{check_gpu_type(gpu_type)}.json"


def db_files(directory: Path) -> list[Path]:
    """The database files in a folder (sorted; a missing folder has none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.json") if is_gpu_type(p.stem) and p.is_file())


def lock_for(path: Path):
    """The lock every read-modify-write of `path` holds: a hidden file beside the real file (a
    symbolic link's target), so two links to one file share one lock."""
    real = real_path(path)
    return file_lock(real.with_name("." + real.name + ".lock"))


# ------------------------------------------------------------------------------------------------
# whole files


UNREADABLE_HINT = ("dsagen never writes over a database file it cannot read: fix it, or move it aside "
                   "(the next tuning run then starts a new one)")


def load(path: Path) -> TuningDB:
    """Read and check one database file; a missing file (also below a folder that is not one) is
    an empty database of its stem's GPU type. A file that does not parse is an error naming its
    line and saying how to recover."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return TuningDB(path, path.stem)
    except UnicodeDecodeError as exc:
        raise TuningDBError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); {UNREADABLE_HINT}") from None
    try:
        return parse(text, path)
    except TuningDBError as exc:
        raise TuningDBError(f"{exc}; {UNREADABLE_HINT}") from None


def check_writable(path: Path) -> None:
    """Refuse, before any lock or write, to replace a read-only database file, or to write in its
    folder (where the lock file goes too) when this process may not: one error naming the file
    instead of an errno about a lock file. A missing folder is left to the write, which creates it."""
    path = Path(path)
    real = real_path(path)
    if real.is_file() and not os.access(real, os.W_OK):
        raise TuningDBError(f"{path}: the file is read-only: make it writable, or write the result to another file")
    if real.parent.is_dir() and not os.access(real.parent, os.W_OK | os.X_OK):
        raise TuningDBError(f"{path}: cannot write in its folder {real.parent} (read-only): write the result to "
                            "another file")


def save(db: TuningDB) -> None:
    """Write the whole file atomically (through a symbolic link, keeping the file's mode). A
    read-modify-write must hold the file's lock: use record, merge or prune."""
    atomic_write_text(db.path, dump(db))


# ------------------------------------------------------------------------------------------------
# read-modify-write


def _check_same_gpu(path: Path, entry: Entry) -> None:
    if entry.gpu_type != path.stem:
        raise TuningDBError(f"{path}: cannot record an entry of GPU type {entry.gpu_type!r} "
                            f"in the file of {path.stem!r}")


def _outcome(old: Entry | None, new: Entry) -> str:
    """What record does with a new entry, given the one already stored under its key."""
    if old is None:
        return "added"
    if old.versions != new.versions or old.schedule == new.schedule or new.ms < old.ms:
        return "replaced"
    return f"kept: existing entry is faster ({old.ms:.4g} ms)"


def record(path: Path, entry: Entry, beaten: dict | None = None) -> str:
    """Store a tuning result unless a faster, current one is already there. `beaten`: a schedule
    the new entry beat side by side (`dsagen tune`'s duel); a stored entry with that schedule is
    replaced whatever time it recorded, a time taken on another day.

    The file is re-read inside its lock, so concurrent writers never drop each other's entries; a
    corrupt file raises TuningDBError and is left exactly as it is. Returns "added", "replaced" or
    "kept: ...".
    """
    path = Path(path)
    entry = Entry.from_json(entry.to_json(), f"entry for {path}")  # never write what load rejects
    _check_same_gpu(path, entry)
    check_writable(path)
    with lock_for(path):
        db = load(path)
        old = db.entries.get(entry.key)
        outcome = "replaced" if old is not None and old.schedule == beaten else _outcome(old, entry)
        if not outcome.startswith("kept"):
            db.entries[entry.key] = entry
            save(db)
    return outcome


def prune(path: Path, keep: Callable[[Entry], bool], dry_run: bool = False) -> list[Entry]:
    """Drop the entries `keep` rejects (under the file's lock, re-read first); returns them. A dry
    run only reads: no lock file, so it works on a database it may not write."""
    path = Path(path)
    if dry_run:
        return [e for e in load(path).entries.values() if not keep(e)]
    check_writable(path)
    with lock_for(path):
        db = load(path)
        dropped = [e for e in db.entries.values() if not keep(e)]
        if dropped:
            for e in dropped:
                del db.entries[e.key]
            save(db)
    return dropped


def annotate(path: Path, semantics_by_hash: dict[tuple[str, str], dict]) -> list[Entry]:
    """Give entries without recorded semantic fields those of their (kernel, spec hash), where
    semantics_by_hash knows them (under the file's lock, re-read first); returns the entries
    annotated. Entries recorded before the field existed can then answer specs that differ only
    in a near field (the head count)."""
    path = Path(path)
    check_writable(path)
    with lock_for(path):
        db = load(path)
        done = []
        for key, entry in db.entries.items():
            fields = semantics_by_hash.get((entry.kernel, entry.spec_hash))
            if entry.semantics is None and fields is not None:
                db.entries[key] = replace(entry, semantics=dict(fields))
                done.append(db.entries[key])
        if done:
            save(db)
    return done


def _b_wins(ours: Entry, theirs: Entry) -> bool:
    """Merge rule: the faster entry; on a tie the later date."""
    return theirs.ms < ours.ms or (theirs.ms == ours.ms and theirs.date > ours.date)


def merge(a: Path, b: Path, out: Path | None = None) -> dict[str, int]:
    """Merge database b into a (the faster entry per key), written atomically to out or a.

    Returns counts: added (keys only b had), replaced (b's entry won), kept (a's entry won), total.
    """
    a, b = Path(a), Path(b)
    target = Path(out) if out is not None else a
    if not b.is_file():
        raise TuningDBError(f"{b}: no such tuning database to merge")
    check_writable(target)
    with lock_for(target):
        ours, theirs = load(a), load(b)
        if ours.gpu_type != theirs.gpu_type:
            raise TuningDBError(f"cannot merge {b} (GPU type {theirs.gpu_type}) into {a} "
                                f"(GPU type {ours.gpu_type}): both must be of the same GPU type")
        if target.stem != ours.gpu_type:
            raise TuningDBError(f"{target}: the merged database of {ours.gpu_type} must be written to "
                                f"a file named {ours.gpu_type}.json")
        counts = {"added": 0, "replaced": 0, "kept": 0}
        merged = dict(ours.entries)
        for key, entry in theirs.entries.items():
            if key not in merged:
                counts["added"] += 1
            elif _b_wins(merged[key], entry):
                counts["replaced"] += 1
            else:
                counts["kept"] += 1
                continue
            merged[key] = entry
        save(TuningDB(target, ours.gpu_type, merged))
    counts["total"] = len(merged)
    return counts
