"""The per-GPU tuning database: one JSON file per GPU type (autotune_db/nvidia-h200.json, ...)
holding the fastest schedule measured per (kernel, backend, spec hash, shape bucket).

Two folders are searched, the user's (cache_dir()/autotune_db, written by tuning runs) before the
shipped one (autotune_db/ in a checkout, dsagen/_data/autotune_db in the wheel). Files hold one
entry per line so that git diffs stay readable and every error can name the line at fault.
Writers lock the file and re-read it inside the lock, so tuning processes running side by side
never drop each other's entries; writes are atomic, so a crash never leaves half a file.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from ..__version__ import __version__
from ..errors import DsagenError
from ..fileio import atomic_write_text, cache_dir, file_lock
from ..gpus import GPUS
from ..resources import data_dir
from ..spec import ALL_KERNELS as KERNELS
from .buckets import bucket_distance, bucket_of, parse_bucket

FORMAT = "dsagen-autotune-db"
VERSION = 1
VERSION_KEYS = ("dsagen", "torch", "triton", "cuda")
NULLABLE_VERSIONS = ("triton", "cuda")  # null: triton not installed, a CPU-only torch
_TOP_KEYS = ("format", "version", "gpu_type", "entries")
_GPU_TYPE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_CC = re.compile(r"^[0-9]+\.[0-9]+$")

Key = tuple[str, str, str, str]  # (kernel, backend, spec_hash, bucket)


class TuningDBError(DsagenError):
    """A tuning database is unreadable or invalid (the message names file:line), or a merge or
    record would mix GPU types."""


def _show(value: Any) -> str:
    """A value as it would be written in the file, for error messages."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# ------------------------------------------------------------------------------------------------
# entries


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _is_bucket(v: Any) -> bool:
    try:
        parse_bucket(v)
    except ValueError:
        return False
    return True


def _is_date(v: Any) -> bool:
    try:
        datetime.fromisoformat(v)
    except (TypeError, ValueError):
        return False
    return True


def _is_int_map(v: Any, minimum: int | None) -> bool:
    return isinstance(v, dict) and all(
        _is_text(k) and _is_int(n) and (minimum is None or n >= minimum) for k, n in v.items())


def _is_versions(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == set(VERSION_KEYS) and all(
        _is_text(v[k]) or (v[k] is None and k in NULLABLE_VERSIONS) for k in VERSION_KEYS)


# field -> (what is allowed, check); the order is the order of Entry's fields
_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "kernel": (f"one of {', '.join(KERNELS)}", lambda v: isinstance(v, str) and v in KERNELS),
    "backend": ("a non-empty string like \"triton\"", _is_text),
    "spec_hash": ("16 lowercase hex characters", lambda v: isinstance(v, str) and bool(_HEX16.match(v))),
    "bucket": ("a bucket \"S<pow2>-SKV<pow2>\"", _is_bucket),
    "shape": ("an object of size name -> integer >= 1, e.g. {\"S\": 4096, \"SKV\": 32768}",
              lambda v: bool(v) and _is_int_map(v, 1)),
    "schedule": ("an object of knob -> integer", lambda v: _is_int_map(v, None)),
    "ms": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "tflops": ("a number >= 0 or null", lambda v: v is None or (_is_number(v) and v >= 0)),
    "gbps": ("a number >= 0 or null", lambda v: v is None or (_is_number(v) and v >= 0)),
    "pct_of_roofline": ("a number >= 0 or null", lambda v: v is None or (_is_number(v) and v >= 0)),
    "gpu_type": ("a GPU type like \"nvidia-h200\" (a-z, 0-9, '.', '_', '-')",
                 lambda v: isinstance(v, str) and bool(_GPU_TYPE.match(v))),
    "device_name": ("a string", lambda v: isinstance(v, str)),
    "compute_capability": ("a string like \"9.0\" (or \"cpu\")",
                           lambda v: isinstance(v, str) and (v == "cpu" or bool(_CC.match(v)))),
    "date": ("an ISO date string like \"2026-11-28\"", _is_date),
    "versions": ("an object with exactly the keys dsagen, torch, triton, cuda and string values "
                 "(triton and cuda may be null)", _is_versions),
    "trials": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "sampler": ("a non-empty string like \"grid\" or \"tpe\"", _is_text),
    "study": ("a string (the Optuna study name)", lambda v: isinstance(v, str)),
}


@dataclass(frozen=True)
class Entry:
    """The winning schedule of one tuning run: what was tuned, how fast, where and with what."""

    kernel: str
    backend: str
    spec_hash: str
    bucket: str
    shape: dict[str, int]
    schedule: dict[str, int]
    ms: float
    tflops: float | None
    gbps: float | None
    pct_of_roofline: float | None
    gpu_type: str
    device_name: str
    compute_capability: str
    date: str
    versions: dict[str, str | None]
    trials: int
    sampler: str
    study: str

    @property
    def key(self) -> Key:
        return (self.kernel, self.backend, self.spec_hash, self.bucket)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["shape"] = dict(sorted(self.shape.items()))
        data["schedule"] = dict(sorted(self.schedule.items()))
        data["versions"] = {k: self.versions.get(k) for k in VERSION_KEYS}
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> Entry:
        """Check every field of a parsed entry; errors start with `where` (file:line)."""
        if not isinstance(data, dict):
            raise TuningDBError(f"{where}: an entry must be a JSON object, got {_show(data)}")
        for name in _CHECKS:
            if name not in data:
                raise TuningDBError(f"{where}: entry is missing field {name!r}")
        unknown = sorted(set(data) - set(_CHECKS))
        if unknown:
            raise TuningDBError(f"{where}: entry has unknown field {unknown[0]!r} "
                                f"(allowed: {', '.join(_CHECKS)})")
        for name, (allowed, ok) in _CHECKS.items():
            if not ok(data[name]):
                raise TuningDBError(f"{where}: entry field {name!r} must be {allowed}, got {_show(data[name])}")
        shape = data["shape"]
        if "S" in shape and "SKV" in shape and bucket_of(shape["S"], shape["SKV"]) != data["bucket"]:
            raise TuningDBError(f"{where}: entry field 'bucket' is {_show(data['bucket'])} but shape "
                                f"S={shape['S']}, SKV={shape['SKV']} falls in {bucket_of(shape['S'], shape['SKV'])}")
        values = dict(data, shape=dict(shape), schedule=dict(data["schedule"]), versions=dict(data["versions"]),
                      ms=float(data["ms"]))
        for name in ("tflops", "gbps", "pct_of_roofline"):
            values[name] = None if data[name] is None else float(data[name])
        return cls(**values)


def _sort_key(key: Key) -> tuple:
    kernel, backend, spec_hash, bucket = key
    return (kernel, backend, spec_hash, parse_bucket(bucket))


# ------------------------------------------------------------------------------------------------
# files


@dataclass
class TuningDB:
    """One GPU type's file: its entries by key."""

    path: Path
    gpu_type: str
    entries: dict[Key, Entry] = field(default_factory=dict)


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


def check_gpu_type(gpu_type: str) -> str:
    """A GPU type becomes a file name, so only lowercase letters, digits, '.', '_' and '-'."""
    if not isinstance(gpu_type, str) or not _GPU_TYPE.match(gpu_type):
        raise ValueError(f"bad GPU type {gpu_type!r}: allowed are lowercase letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit (e.g. 'nvidia-h200')")
    return gpu_type


def db_path(gpu_type: str, directory: Path | None = None) -> Path:
    """The file of one GPU type: <directory>/<gpu_type>.json (default: the user's folder)."""
    return Path(directory if directory is not None else user_db_dir()) / f"{check_gpu_type(gpu_type)}.json"


def db_files(directory: Path) -> list[Path]:
    """The database files in a folder (sorted; a missing folder has none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.json") if _GPU_TYPE.match(p.stem) and p.is_file())


def lock_for(path: Path):
    """The lock every read-modify-write of `path` holds: a hidden file beside it."""
    return file_lock(path.with_name("." + path.name + ".lock"))


_WHITESPACE = " \t\n\r"


def _layout(text: str) -> tuple[dict[str, int], list[int]]:
    """Line numbers of the top-level keys' values and of each entry's first character.

    Walks the text (already known to be valid JSON) with raw_decode, so it works however the file
    is formatted, also by hand.
    """
    decoder = json.JSONDecoder()
    seen = [0, 1]  # position, line: counted forward once, not from the start every time

    def line_at(pos: int) -> int:
        seen[1] += text.count("\n", seen[0], pos)
        seen[0] = pos
        return seen[1]

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in _WHITESPACE:
            pos += 1
        return pos

    keys: dict[str, int] = {}
    entries: list[int] = []
    pos = skip(0)
    if text[pos] != "{":
        return keys, entries
    pos = skip(pos + 1)
    while text[pos] != "}":
        name, pos = decoder.raw_decode(text, pos)
        pos = skip(skip(pos) + 1)  # past the ':'
        keys[name] = line_at(pos)
        if name == "entries" and text[pos] == "[":
            entries = []
            pos = skip(pos + 1)
            while text[pos] != "]":
                entries.append(line_at(pos))
                _, pos = decoder.raw_decode(text, pos)
                pos = skip(pos)
                if text[pos] == ",":
                    pos = skip(pos + 1)
            pos += 1
        else:
            _, pos = decoder.raw_decode(text, pos)
        pos = skip(pos)
        if text[pos] == ",":
            pos = skip(pos + 1)
    return keys, entries


def parse(text: str, path: Path) -> TuningDB:
    """Check and read a database file's text; every error names path:line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TuningDBError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    keys, entry_lines = _layout(text)
    first = text.count("\n", 0, len(text) - len(text.lstrip(_WHITESPACE))) + 1
    if not isinstance(data, dict):
        raise TuningDBError(f"{path}:{first}: the top level must be a JSON object with keys "
                            f"{', '.join(_TOP_KEYS)}, got {type(data).__name__}")
    for name in _TOP_KEYS:
        if name not in data:
            raise TuningDBError(f"{path}:{first}: missing top-level key {name!r}")
    for name in data:
        if name not in _TOP_KEYS:
            raise TuningDBError(f"{path}:{keys[name]}: unknown top-level key {name!r} (allowed: {', '.join(_TOP_KEYS)})")
    if data["format"] != FORMAT:
        raise TuningDBError(f"{path}:{keys['format']}: 'format' must be {_show(FORMAT)}, got {_show(data['format'])}")
    if not _is_int(data["version"]) or data["version"] != VERSION:
        raise TuningDBError(f"{path}:{keys['version']}: unsupported 'version' {_show(data['version'])}: "
                            f"dsagen {__version__} reads version {VERSION}")
    gpu_type = data["gpu_type"]
    if gpu_type != path.stem:
        raise TuningDBError(f"{path}:{keys['gpu_type']}: 'gpu_type' is {_show(gpu_type)} but the file is named "
                            f"{path.name}: the database of GPU type G must be named G.json")
    if not isinstance(data["entries"], list):
        raise TuningDBError(f"{path}:{keys['entries']}: 'entries' must be a JSON array, got {_show(data['entries'])}")
    db = TuningDB(path, gpu_type)
    first_line: dict[Key, int] = {}
    for raw, line in zip(data["entries"], entry_lines):
        entry = Entry.from_json(raw, f"{path}:{line}")
        if entry.gpu_type != gpu_type:
            raise TuningDBError(f"{path}:{line}: entry field 'gpu_type' is {_show(entry.gpu_type)} "
                                f"but this is the file of {_show(gpu_type)}")
        if entry.key in first_line:
            raise TuningDBError(f"{path}:{line}: duplicate entry (kernel={entry.kernel}, backend={entry.backend}, "
                                f"spec_hash={entry.spec_hash}, bucket={entry.bucket}): "
                                f"lines {first_line[entry.key]} and {line}")
        first_line[entry.key] = line
        db.entries[entry.key] = entry
    return db


def load(path: Path) -> TuningDB:
    """Read and check one database file; a missing file is an empty database of its stem's GPU type."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return TuningDB(path, path.stem)
    except UnicodeDecodeError as exc:
        raise TuningDBError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse(text, path)


def dump(db: TuningDB) -> str:
    """The file text: valid JSON, one entry per line, entries sorted by key."""
    head = f'{{"format": {_show(FORMAT)}, "version": {VERSION}, "gpu_type": {_show(db.gpu_type)},\n "entries": ['
    lines = [f"  {json.dumps(db.entries[key].to_json())}" for key in sorted(db.entries, key=_sort_key)]
    body = "\n" + ",\n".join(lines) + "\n" if lines else ""
    return f"{head}{body} ]}}\n"


def save(db: TuningDB) -> None:
    """Write the whole file atomically. A read-modify-write must hold the file's lock: use record/merge."""
    atomic_write_text(db.path, dump(db))


# ------------------------------------------------------------------------------------------------
# writing


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


def record(path: Path, entry: Entry) -> str:
    """Store a tuning result unless a faster, current one is already there.

    The file is re-read inside its lock, so concurrent writers never drop each other's entries; a
    corrupt file raises TuningDBError and is left exactly as it is. Returns "added", "replaced" or
    "kept: ...".
    """
    path = Path(path)
    entry = Entry.from_json(entry.to_json(), f"entry for {path}")  # never write what load rejects
    _check_same_gpu(path, entry)
    with lock_for(path):
        db = load(path)
        outcome = _outcome(db.entries.get(entry.key), entry)
        if not outcome.startswith("kept"):
            db.entries[entry.key] = entry
            save(db)
    return outcome


def prune(path: Path, keep: Callable[[Entry], bool], dry_run: bool = False) -> list[Entry]:
    """Drop the entries `keep` rejects (under the file's lock, re-read first); returns them."""
    path = Path(path)
    with lock_for(path):
        db = load(path)
        dropped = [e for e in db.entries.values() if not keep(e)]
        if dropped and not dry_run:
            for e in dropped:
                del db.entries[e.key]
            save(db)
    return dropped


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


# ------------------------------------------------------------------------------------------------
# reading


@functools.lru_cache(maxsize=1)
def _running_versions() -> tuple[tuple[str, str | None], ...]:
    import torch

    try:
        import triton

        triton_version: str | None = str(triton.__version__)
    except ImportError:
        triton_version = None
    return (("dsagen", __version__), ("torch", str(torch.__version__)), ("triton", triton_version),
            ("cuda", torch.version.cuda))


def running_versions() -> dict[str, str | None]:
    """dsagen, torch, triton and CUDA versions of this process (triton, cuda: None if absent)."""
    return dict(_running_versions())


def stale_fields(entry: Entry, running: dict[str, str | None] | None = None) -> list[str]:
    """Why an entry may no longer be the fastest: its versions that differ from the running ones."""
    running = running_versions() if running is None else running
    return [f"{k} {entry.versions.get(k)} != {running.get(k)}"
            for k in VERSION_KEYS if entry.versions.get(k) != running.get(k)]


@dataclass(frozen=True)
class Found:
    """A lookup's answer: the entry, how it was chosen (for `dsagen check`), its file, staleness."""

    entry: Entry
    source: str
    path: Path
    stale: list[str]


def _by_bucket(paths: list[Path], match: Callable[[Entry], bool]) -> dict[str, tuple[Entry, Path]]:
    """bucket -> (entry, file) over files in priority order: the first file holding a bucket wins."""
    found: dict[str, tuple[Entry, Path]] = {}
    for path in paths:
        for entry in load(path).entries.values():
            if match(entry):
                found.setdefault(entry.bucket, (entry, path))
    return found


def _rank(want: str, bucket: str) -> tuple[float, int, int]:
    """Nearest first; on a tie the larger bucket (a larger problem's schedule is the safer guess)."""
    S, SKV = parse_bucket(bucket)
    return (bucket_distance(want, bucket), -S * SKV, -S)


def _compute_capability_of(gpu_type: str) -> str | None:
    gpu = GPUS.get(gpu_type)
    return None if gpu is None else f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}"


def lookup(*, kernel: str, backend: str, spec_hash: str, S: int, SKV: int, gpu_type: str,
           compute_capability: str | None, dirs: list[Path] | None = None,
           usable: Callable[[Entry], bool] | None = None) -> Found | None:
    """The tuned entry for a kernel at (S, SKV) on a GPU type, or None.

    Order: this GPU type's exact bucket, then its nearest bucket, then another GPU type's entry
    tuned on the same compute capability (exact, then nearest). dirs default to the user's folder,
    then the shipped one; for the same key an earlier folder wins. compute_capability None: known
    GPU types take theirs from dsagen.gpus, unknown ones skip the other-GPU step. Entries that
    `usable` rejects (say, schedules recorded before the search space grew a knob) are passed over,
    so the nearest usable bucket answers instead.
    """
    dirs = default_dirs() if dirs is None else [Path(d) for d in dirs]
    want = bucket_of(S, SKV)
    cc = compute_capability if compute_capability is not None else _compute_capability_of(gpu_type)

    def same_kernel(entry: Entry) -> bool:
        return ((entry.kernel, entry.backend, entry.spec_hash) == (kernel, backend, spec_hash)
                and (usable is None or usable(entry)))

    def found(hit: tuple[Entry, Path], source: str) -> Found:
        return Found(hit[0], source, hit[1], stale_fields(hit[0]))

    own = _by_bucket([db_path(gpu_type, d) for d in dirs], same_kernel)
    if want in own:
        return found(own[want], f"tuned (exact bucket {want})")
    if own:
        near = min(own, key=lambda b: _rank(want, b))
        return found(own[near], f"tuned (nearest bucket {near} for {want})")
    if cc is None:
        return None
    others: dict[str, list[Path]] = {}
    for d in dirs:
        for path in db_files(d):
            if path.stem != gpu_type:
                others.setdefault(path.stem, []).append(path)
    same_cc = {g: _by_bucket(paths, lambda e: same_kernel(e) and e.compute_capability == cc)
               for g, paths in sorted(others.items())}
    for g, buckets in same_cc.items():
        if want in buckets:
            return found(buckets[want], f"tuned on {g} (same compute capability {cc}, bucket {want})")
    candidates = [(_rank(want, b), g, b) for g, buckets in same_cc.items() for b in buckets]
    if not candidates:
        return None
    _, g, near = min(candidates)
    return found(same_cc[g][near], f"tuned on {g} (same compute capability {cc}, nearest bucket {near} for {want})")


def effective_entries(gpu_type: str, dirs: list[Path] | None = None) -> TuningDB:
    """One GPU type's entries over all folders, an earlier folder's entry winning (user over shipped)."""
    dirs = default_dirs() if dirs is None else [Path(d) for d in dirs]
    entries: dict[Key, Entry] = {}
    for d in reversed(dirs):
        entries.update(load(db_path(gpu_type, d)).entries)
    return TuningDB(db_path(gpu_type, dirs[0] if dirs else None), gpu_type, entries)
