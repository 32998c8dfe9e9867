"""The tuning database's file format: one JSON file per GPU type, one entry per line.

An entry is the winning schedule of one tuning run for a (kernel, backend, spec hash, shape
bucket). Everything read from a file is checked field by field, and every error names the file
and the line at fault, however the file is formatted. Nothing here touches the disk: store.py
reads and writes files, lookup.py answers a build's questions.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from ..__version__ import __version__
from ..errors import DsagenError
from .buckets import bucket_of, parse_bucket

FORMAT = "dsagen-autotune-db"
VERSION = 1
VERSION_KEYS = ("dsagen", "torch", "triton", "cuda")
NULLABLE_VERSIONS = ("triton", "cuda")  # null: triton not installed, a CPU-only torch
_TOP_KEYS = ("format", "version", "gpu_type", "entries")
_GPU_TYPE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
# Kernels are checked by form, not against a list: a file may hold kernels this install does not
# know (a newer dsagen, a plugin that is not installed); lookups simply never match those.
KERNEL_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
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
    except (TypeError, ValueError, RecursionError):
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


def _is_schedule(v: Any) -> bool:
    """knob -> integer, and optionally "variant" -> the algorithm's name (a kernel's variant)."""
    return isinstance(v, dict) and _is_int_map({k: n for k, n in v.items() if k != "variant"}, None) and (
        "variant" not in v or (isinstance(v["variant"], str) and bool(KERNEL_NAME.match(v["variant"]))))


def _is_versions(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == set(VERSION_KEYS) and all(
        _is_text(v[k]) or (v[k] is None and k in NULLABLE_VERSIONS) for k in VERSION_KEYS)


# field -> (what is allowed, check); the order is the order of Entry's fields
_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "kernel": ("a kernel name like \"sparse_attention\" (lowercase letters, digits and '_', "
               "starting with a letter)", lambda v: isinstance(v, str) and bool(KERNEL_NAME.match(v))),
    "backend": ("a non-empty string like \"triton\"", _is_text),
    "spec_hash": ("16 lowercase hex characters", lambda v: isinstance(v, str) and bool(_HEX16.match(v))),
    "bucket": ("a bucket \"S<pow2>-SKV<pow2>\"", _is_bucket),
    "shape": ("an object of size name -> integer >= 1, e.g. {\"S\": 4096, \"SKV\": 32768}",
              lambda v: bool(v) and _is_int_map(v, 1)),
    "schedule": ("an object of knob -> integer, with \"variant\" -> a variant name (like \"gluon_split\") "
                 "where the kernel has several algorithms", _is_schedule),
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


def _is_semantics(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(
        _is_text(k) and ((_is_int(x) and x >= 0) or _is_text(x)) for k, x in v.items())


def recordable_semantics(fields: dict[str, Any]) -> dict[str, int | str] | None:
    """An op's semantic fields as an entry records them, or None when one of them is neither an
    integer >= 0 nor a non-empty string (a plugin's float, say): such entries still serve their own
    spec hash, only not as a neighbour of other specs."""
    return dict(fields) if _is_semantics(fields) else None


# optional fields: field -> (what is allowed, check); absent means None
_OPTIONAL: dict[str, tuple[str, Callable[[Any], bool]]] = {
    # the op's semantic fields the spec hash was made from (heads, dims, dtypes): lets a spec that
    # differs only in its head count find this entry as its nearest tuned neighbour
    "semantics": ("an object of field -> integer >= 0 or non-empty string, e.g. {\"heads\": 64, \"dtype\": "
                  "\"fp8_e4m3\"}", _is_semantics),
}


@dataclass(frozen=True)
class Entry:
    """The winning schedule of one tuning run: what was tuned, how fast, where and with what."""

    kernel: str
    backend: str
    spec_hash: str
    bucket: str
    shape: dict[str, int]
    schedule: dict[str, int | str]  # knob -> value, and "variant" -> the algorithm where there are several
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
    semantics: dict[str, int | str] | None = None

    @property
    def key(self) -> Key:
        return (self.kernel, self.backend, self.spec_hash, self.bucket)

    def describe(self) -> str:
        """The entry in a few words, for messages: kernel, backend, bucket, spec hash."""
        return f"{self.kernel} ({self.backend}, {self.bucket}, spec {self.spec_hash})"

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["shape"] = dict(sorted(self.shape.items()))
        data["schedule"] = dict(sorted(self.schedule.items()))
        data["versions"] = {k: self.versions.get(k) for k in VERSION_KEYS}
        if self.semantics is None:
            del data["semantics"]
        else:
            data["semantics"] = dict(sorted(self.semantics.items()))
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> Entry:
        """Check every field of a parsed entry; errors start with `where` (file:line)."""
        if not isinstance(data, dict):
            raise TuningDBError(f"{where}: an entry must be a JSON object, got {_show(data)}")
        for name in _CHECKS:
            if name not in data:
                raise TuningDBError(f"{where}: entry is missing field {name!r}")
        unknown = sorted(set(data) - set(_CHECKS) - set(_OPTIONAL))
        if unknown:
            raise TuningDBError(f"{where}: entry has unknown field {unknown[0]!r} "
                                f"(allowed: {', '.join([*_CHECKS, *_OPTIONAL])})")
        for name, (allowed, ok) in [*_CHECKS.items(), *_OPTIONAL.items()]:
            if name in data and not ok(data[name]):
                raise TuningDBError(f"{where}: entry field {name!r} must be {allowed}, got {_show(data[name])}")
        shape = data["shape"]
        if "S" in shape and "SKV" in shape and bucket_of(shape["S"], shape["SKV"]) != data["bucket"]:
            raise TuningDBError(f"{where}: entry field 'bucket' is {_show(data['bucket'])} but shape "
                                f"S={shape['S']}, SKV={shape['SKV']} falls in {bucket_of(shape['S'], shape['SKV'])}")
        values = dict(data, shape=dict(shape), schedule=dict(data["schedule"]), versions=dict(data["versions"]),
                      ms=float(data["ms"]))
        if "semantics" in data:
            values["semantics"] = dict(data["semantics"])
        for name in ("tflops", "gbps", "pct_of_roofline"):
            values[name] = None if data[name] is None else float(data[name])
        return cls(**values)


def sort_key(key: Key) -> tuple:
    """The order of entries in a file: kernel, backend, spec hash, then bucket by size."""
    kernel, backend, spec_hash, bucket = key
    return (kernel, backend, spec_hash, parse_bucket(bucket))


# ------------------------------------------------------------------------------------------------
# one file


@dataclass
class TuningDB:
    """One GPU type's file: its entries by key, and the line each entry was read from."""

    path: Path
    gpu_type: str
    entries: dict[Key, Entry] = field(default_factory=dict)
    lines: dict[Key, int] = field(default_factory=dict)

    def where(self, key: Key) -> str:
        """'file:line' of an entry read from the file, else the file alone."""
        line = self.lines.get(key)
        return f"{self.path}:{line}" if line is not None else str(self.path)


def check_gpu_type(gpu_type: str) -> str:
    """A GPU type becomes a file name, so only lowercase letters, digits, '.', '_' and '-'."""
    if not isinstance(gpu_type, str) or not _GPU_TYPE.match(gpu_type):
        raise ValueError(f"bad GPU type {gpu_type!r}: allowed are lowercase letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit (e.g. 'nvidia-h200')")
    return gpu_type


def is_gpu_type(name: str) -> bool:
    """Whether a file stem can be a GPU type's database."""
    return bool(_GPU_TYPE.match(name))


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
    """Check and read a database file's text; every error names path:line (or the file alone, when
    the JSON is nested too deeply to read at all)."""
    path = Path(path)
    try:
        return _parse(text, path)
    except RecursionError:
        raise TuningDBError(f"{path}: invalid JSON: nested too deeply (a tuning database holds "
                            "flat entries, one per line)") from None


def _parse(text: str, path: Path) -> TuningDB:
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
    for raw, line in zip(data["entries"], entry_lines):
        entry = Entry.from_json(raw, f"{path}:{line}")
        if entry.gpu_type != gpu_type:
            raise TuningDBError(f"{path}:{line}: entry field 'gpu_type' is {_show(entry.gpu_type)} "
                                f"but this is the file of {_show(gpu_type)}")
        if entry.key in db.lines:
            raise TuningDBError(f"{path}:{line}: duplicate entry (kernel={entry.kernel}, backend={entry.backend}, "
                                f"spec_hash={entry.spec_hash}, bucket={entry.bucket}): "
                                f"lines {db.lines[entry.key]} and {line}")
        db.lines[entry.key] = line
        db.entries[entry.key] = entry
    return db


def dump(db: TuningDB) -> str:
    """The file text: valid JSON, one entry per line, entries sorted by key."""
    head = f'{{"format": {_show(FORMAT)}, "version": {VERSION}, "gpu_type": {_show(db.gpu_type)},\n "entries": ['
    lines = [f"  {json.dumps(db.entries[key].to_json())}" for key in sorted(db.entries, key=sort_key)]
    body = "\n" + ",\n".join(lines) + "\n" if lines else ""
    return f"{head}{body} ]}}\n"
