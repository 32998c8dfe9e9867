"""What a build asks the tuning database: the tuned schedule of a kernel at a shape on a GPU type.

Entries that cannot be used are passed over with a warning on the "dsagen" logger, once per entry
and process: an empty schedule, or a schedule the caller's `usable` check rejects (typically one
recorded before the search space grew a knob). The next usable entry answers instead.

A file that does not parse stops only the lookups that need it: one of the asking GPU type is an
error (saying how to recover); one of another GPU type is read only when its compute capability
could match, and then passed over with a warning, once per file and process.
"""
from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..__version__ import __version__
from ..gpus import GPUS
from .buckets import bucket_distance, bucket_of, parse_bucket
from .schema import VERSION_KEYS, Entry, Key, TuningDB, TuningDBError
from .store import db_files, db_path, default_dirs, load

log = logging.getLogger("dsagen")

# ------------------------------------------------------------------------------------------------
# versions


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
    """Why an entry may no longer be the fastest: its versions that differ from the running ones,
    each as 'torch 2.11.0+cu130 != 2.13.0+cpu' (recorded != running; an absent version is 'none')."""
    running = running_versions() if running is None else running
    return [f"{k} {_shown(entry.versions.get(k))} != {_shown(running.get(k))}"
            for k in VERSION_KEYS if entry.versions.get(k) != running.get(k)]


def _shown(version: str | None) -> str:
    return "none" if version is None else version  # null: triton absent, a CPU-only torch


# ------------------------------------------------------------------------------------------------
# entries passed over, with a warning once per entry and process

_warned: set[tuple] = set()
_warned_lock = threading.Lock()


def _warn_once(db: TuningDB, entry: Entry, why: str) -> None:
    token = (str(db.path), entry.key, tuple(sorted(entry.schedule.items())), why)
    with _warned_lock:
        if token in _warned:
            return
        _warned.add(token)
    log.warning("dsagen: %s: skipped the tuned entry of %s: %s", db.where(entry.key), entry.describe(), why)


EMPTY_SCHEDULE = "its schedule is empty"
UNUSABLE_SCHEDULE = ("its schedule {schedule} does not fit today's search space (unknown or missing knobs); "
                     "`dsagen db prune FILE` removes such entries")


def _empty(db: TuningDB, entry: Entry) -> bool:
    """An entry with an empty schedule tunes nothing: warn (once) and pass it over."""
    if entry.schedule:
        return False
    _warn_once(db, entry, EMPTY_SCHEDULE)
    return True


# ------------------------------------------------------------------------------------------------
# lookup


@dataclass(frozen=True)
class Found:
    """A lookup's answer: the entry, how it was chosen (for `dsagen check`), its file, staleness."""

    entry: Entry
    source: str
    path: Path
    stale: list[str]


def _by_bucket(dbs: list[TuningDB], match: Callable[[Entry], bool],
               usable: Callable[[Entry], bool] | None) -> dict[str, tuple[Entry, Path]]:
    """bucket -> (entry, file) over files in priority order: the first file holding a usable entry
    for a bucket wins. Matching entries that cannot be used are warned about and passed over."""
    found: dict[str, tuple[Entry, Path]] = {}
    for db in dbs:
        path = db.path
        for entry in db.entries.values():
            if not match(entry) or entry.bucket in found or _empty(db, entry):
                continue
            if usable is not None and not usable(entry):
                schedule = " ".join(f"{k}={v}" for k, v in sorted(entry.schedule.items()))
                _warn_once(db, entry, UNUSABLE_SCHEDULE.format(schedule=schedule))
                continue
            found[entry.bucket] = (entry, path)
    return found


def _rank(want: str, bucket: str) -> tuple[float, int, int]:
    """Nearest first; on a tie the larger bucket (a larger problem's schedule is the safer guess)."""
    S, SKV = parse_bucket(bucket)
    return (bucket_distance(want, bucket), -S * SKV, -S)


def _compute_capability_of(gpu_type: str) -> str | None:
    gpu = GPUS.get(gpu_type)
    return None if gpu is None else f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}"


def _may_hold(gpu_type: str, cc: str) -> bool:
    """Whether the file of `gpu_type` can hold entries tuned on compute capability `cc`: a GPU type
    dsagen knows has its own; a CPU type's entries are "cpu"; an unknown GPU type may have any."""
    known = _compute_capability_of(gpu_type)
    if known is not None:
        return known == cc
    if gpu_type.startswith("cpu-"):
        return cc == "cpu"
    return True


_unreadable_warned: set[str] = set()


def _load_other(path: Path) -> TuningDB | None:
    """Another GPU type's file, or None where it does not parse: it is not the file this lookup is
    about, so it is passed over with a warning (once per file and process) and left as it is."""
    try:
        return load(path)
    except TuningDBError as exc:
        with _warned_lock:
            first = str(path) not in _unreadable_warned
            _unreadable_warned.add(str(path))
        if first:
            log.warning("dsagen: skipped the tuning database of another GPU type: %s", exc)
        return None


def _nearest_semantics(dbs: list[TuningDB], kernel: str, backend: str, want: str, semantics: Mapping[str, Any],
                       near_fields: tuple[str, ...], fits: Callable[[Entry], bool]) -> Found | None:
    """Among entries of this kernel whose recorded semantic fields equal `semantics` except in
    `near_fields` (positive integers such as the head count), the nearest: the smallest sum of
    |log2(theirs / ours)| over those fields, then the nearest bucket; `fits` rejects schedules that
    are illegal for the asking spec. An earlier file wins a tie. The source says only what was
    near ("for heads=32 (nearest to heads=64), bucket ..."): the caller says whose file it was."""
    near = [f for f in near_fields if isinstance(semantics.get(f), int) and semantics[f] > 0]
    if not near:
        return None
    fixed = {k: v for k, v in semantics.items() if k not in near}

    def similar(e: Entry) -> bool:
        return ((e.kernel, e.backend) == (kernel, backend) and e.semantics is not None
                and set(e.semantics) == set(semantics) and all(e.semantics[k] == v for k, v in fixed.items())
                and all(isinstance(e.semantics[f], int) and e.semantics[f] > 0 for f in near))

    best = None
    for order, db in enumerate(dbs):
        for e in db.entries.values():
            if not similar(e) or _empty(db, e) or not fits(e):
                continue
            distance = sum(abs(math.log2(e.semantics[f] / semantics[f])) for f in near)
            rank = (distance, *_rank(want, e.bucket), order)
            if best is None or rank < best[0]:
                best = (rank, e, db.path)
    if best is None:
        return None
    _, e, path = best
    theirs = ", ".join(f"{f}={e.semantics[f]}" for f in near)
    ours = ", ".join(f"{f}={semantics[f]}" for f in near)
    return Found(e, f"for {theirs} (nearest to {ours}), bucket {e.bucket}", path, stale_fields(e))


def _sibling_paths(dirs: list[Path], gpu_type: str, cc: str) -> list[Path]:
    """The files of the other GPU types that may hold entries tuned on compute capability `cc`."""
    return [path for d in dirs for path in db_files(d) if path.stem != gpu_type and _may_hold(path.stem, cc)]


def _siblings(dirs: list[Path], gpu_type: str, cc: str) -> dict[str, list[TuningDB]]:
    """The readable sibling files (_sibling_paths), per GPU type (sorted), each type's files in
    folder order."""
    others: dict[str, list[TuningDB]] = {}
    for path in _sibling_paths(dirs, gpu_type, cc):
        if (db := _load_other(path)) is not None:
            others.setdefault(path.stem, []).append(db)
    return dict(sorted(others.items()))


def sibling_files(gpu_type: str, dirs: list[Path]) -> list[Path]:
    """The other GPU types' files whose entries tuned on `gpu_type`'s compute capability its builds
    may borrow (none where dsagen does not know that compute capability)."""
    cc = _compute_capability_of(gpu_type)
    return [] if cc is None else _sibling_paths([Path(d) for d in dirs], gpu_type, cc)


def borrowing_gpu_types(cc: str, dirs: list[Path]) -> list[str]:
    """The GPU types dsagen knows, of compute capability `cc`, with no file in `dirs`: their builds
    take every tier of the lookup from the entries other GPU types' files hold for `cc`."""
    present = {path.stem for d in dirs for path in db_files(Path(d))}
    return [g for g in GPUS if g not in present and _compute_capability_of(g) == cc]


def lookup(*, kernel: str, backend: str, spec_hash: str, S: int, SKV: int, gpu_type: str,
           compute_capability: str | None, dirs: list[Path] | None = None,
           usable: Callable[[Entry], bool] | None = None, semantics: Mapping[str, Any] | None = None,
           near_fields: tuple[str, ...] = (), legal: Callable[[Entry], bool] | None = None) -> Found | None:
    """The tuned entry for a kernel at (S, SKV) on a GPU type, or None.

    Order: this GPU type's exact bucket, then its nearest bucket; then another GPU type's entry
    tuned on the same compute capability (exact, then nearest bucket); then, given the asking
    spec's `semantics`, the entry for the nearest value of `near_fields` (say, the nearest tuned
    head count) whose schedule is `legal` here: among this GPU type's entries first, then among
    the same-compute-capability entries of other GPU types, so a GPU type without a file of its
    own (an H100 beside the H200's file) is served by every tier of its sibling's file. dirs
    default to the user's folder, then the shipped one; for the same key an earlier folder wins.
    compute_capability None: known GPU types take theirs from dsagen.gpus, unknown ones skip the
    other-GPU steps. Entries of other kernels (also kernels this install does not know) never
    match. A matching entry with an empty schedule, or one that `usable` rejects (say, a schedule
    recorded before the search space grew a knob), is passed over with a warning, once per entry
    and process, so the nearest usable bucket answers instead.
    """
    dirs = default_dirs() if dirs is None else [Path(d) for d in dirs]
    want = bucket_of(S, SKV)
    cc = compute_capability if compute_capability is not None else _compute_capability_of(gpu_type)

    def same_kernel(entry: Entry) -> bool:
        return (entry.kernel, entry.backend, entry.spec_hash) == (kernel, backend, spec_hash)

    def found(hit: tuple[Entry, Path], source: str) -> Found:
        return Found(hit[0], source, hit[1], stale_fields(hit[0]))

    def nearest_neighbour(dbs: list[TuningDB], fits: Callable[[Entry], bool],
                          tuned_where: Callable[[Entry], str]) -> Found | None:
        if not semantics or not near_fields:
            return None
        hit = _nearest_semantics(dbs, kernel, backend, want, semantics, near_fields,
                                 lambda e: fits(e) and (usable is None or usable(e)) and (legal is None or legal(e)))
        return None if hit is None else Found(hit.entry, f"{tuned_where(hit.entry)} {hit.source}", hit.path, hit.stale)

    own_dbs = [load(db_path(gpu_type, d)) for d in dirs]
    own = _by_bucket(own_dbs, same_kernel, usable)
    if want in own:
        return found(own[want], f"tuned (exact bucket {want})")
    if own:
        near = min(own, key=lambda b: _rank(want, b))
        return found(own[near], f"tuned (nearest bucket {near} for {want})")
    siblings = _siblings(dirs, gpu_type, cc) if cc is not None else {}

    def tuned_on_cc(entry: Entry) -> bool:
        return entry.compute_capability == cc

    same_cc = {g: _by_bucket(dbs, lambda e: same_kernel(e) and tuned_on_cc(e), usable) for g, dbs in siblings.items()}
    for g, buckets in same_cc.items():
        if want in buckets:
            return found(buckets[want], f"tuned on {g} (same compute capability {cc}, bucket {want})")
    candidates = [(_rank(want, b), g, b) for g, buckets in same_cc.items() for b in buckets]
    if candidates:
        _, g, near = min(candidates)
        return found(same_cc[g][near],
                     f"tuned on {g} (same compute capability {cc}, nearest bucket {near} for {want})")
    hit = nearest_neighbour(own_dbs, lambda e: True, lambda e: "tuned")
    if hit is None and siblings:
        hit = nearest_neighbour([db for dbs in siblings.values() for db in dbs], tuned_on_cc,
                                lambda e: f"tuned on {e.gpu_type} (same compute capability {cc})")
    return hit


def effective_entries(gpu_type: str, dirs: list[Path] | None = None) -> TuningDB:
    """One GPU type's entries over all folders, an earlier folder's entry winning (user over
    shipped). Entries with an empty schedule are left out, with a warning."""
    dirs = default_dirs() if dirs is None else [Path(d) for d in dirs]
    entries: dict[Key, Entry] = {}
    for d in dirs:
        db = load(db_path(gpu_type, d))
        for key, entry in db.entries.items():
            if key not in entries and not _empty(db, entry):
                entries[key] = entry
    return TuningDB(db_path(gpu_type, dirs[0] if dirs else None), gpu_type, entries)
