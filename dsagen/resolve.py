"""Step 3 of the pipeline, resolve: the one place a kernel's schedule is decided, for `build`,
`tune`, `check`, `show`, `generate` and `explain` alike.

Order: an override (`build(schedules=...)`, a tuning trial) -> the tuning database (this GPU type's
exact shape bucket, its nearest bucket, then another GPU type of the same compute capability; then
the nearest tuned head count, this GPU type's entries before the other's) -> the spec's pinned
knobs -> the search space's defaults -> the nearest legal point. The answer is a schedule point
and where it came from; lowering and rendering it into a module are the next steps (lower.py,
codegen.py).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Mapping

from . import db as tuning_db
from .db.buckets import bucket_of
from .errors import ScheduleError
from .gpus import GPUS, cpu_type, get_gpu, gpu_type_from_device_name
from .ops import Op, as_op, semantic_hash
from .ops.base import Where
from .plan import problem_symbols
from .schedule import choose, get_variant, load_space, recorded_schedule, split_variant
from .spec import VARIANT_KEY, Spec

log = logging.getLogger("dsagen")

DEFAULT_GPU = "nvidia-h200"  # the GPU type whose limits and database apply when none is named or seen
DEVICE_TYPES = ("cuda", "cpu")


@dataclass(frozen=True)
class Resolved:
    """The schedule one kernel runs with at one shape bucket on one device type, and where it came
    from."""

    kernel: str
    point: dict
    source: str  # "override", "tuned (exact bucket ...), FILE", "pinned", "default", ...
    bucket: str | None  # None: not looked up by shape (interpreter, override, no GPU type)
    device_type: str
    stale: tuple[str, ...] = field(default=())
    variant: str | None = None  # the algorithm (the op's variant; None: it declares none)

    def schedule_mapping(self) -> dict:
        """The point with its variant, as a spec's table, an override or the database write it."""
        return self.point if self.variant is None else {VARIANT_KEY: self.variant, **self.point}


def detected_gpu() -> tuple[str, str] | None:
    """(GPU type, compute capability) of cuda:0, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return gpu_type_from_device_name(torch.cuda.get_device_name(0)), f"{major}.{minor}"


def gpu_context(gpu: str | None, default: str | None = None) -> tuple[str | None, str | None]:
    """(GPU type, compute capability) for a named GPU type, else the one torch sees, else `default`
    (the CLI's offline commands: the H200 of the shipped database) or None (no database on a GPU)."""
    detected = detected_gpu()
    if gpu is not None:
        get_gpu(gpu)  # a named GPU type must be one dsagen knows
        return gpu, (detected[1] if detected and detected[0] == gpu else None)
    if detected is not None:
        if detected[0] not in GPUS:
            log.warning("dsagen: GPU %r is not in dsagen's table; limits of %s are used for legality",
                        detected[0], DEFAULT_GPU)
        return detected
    return default, None


class Resolver:
    """Decides and remembers, per (kernel, shape bucket, device type), the schedule and module."""

    def __init__(self, spec: Spec, backend: str = "triton", gpu_type: str | None = None,
                 compute_capability: str | None = None, overrides: Mapping[str, Mapping[str, int]] | None = None,
                 use_db: bool = True, batch_invariant: bool = False):
        self.spec = spec
        # every call of a kernel resolves at the op's canonical shape, whatever its own: the same
        # schedule (so the same reduction orders) for a row whatever else is in the batch
        self.batch_invariant = batch_invariant
        self.backend = backend
        self.gpu_type = gpu_type  # None: no tuning database for CUDA (no GPU known)
        self.compute_capability = compute_capability
        self.plan_gpu = get_gpu(gpu_type) if gpu_type in GPUS else get_gpu(DEFAULT_GPU)
        self.overrides = {k: dict(v) for k, v in (overrides or {}).items()}
        self.use_db = use_db
        self._memo: dict[tuple, Resolved] = {}
        self._lock = threading.Lock()
        for kernel in self.overrides:  # a bad override fails at once, naming the kernel or the knob
            self.resolve(as_op(kernel))

    def db_type(self, device_type: str) -> str | None:
        """Whose tuning database applies: the GPU type on CUDA; the CPU type for TVM on the CPU;
        none for the Triton interpreter (its timings mean nothing)."""
        if device_type not in DEVICE_TYPES:
            raise ValueError(f"device type {device_type!r}: allowed {', '.join(DEVICE_TYPES)}")
        if device_type == "cuda":
            return self.gpu_type
        return cpu_type() if self.backend == "tvm" else None

    def where(self, device_type: str) -> Where:
        """Where a call of this device type runs: which variants may run there."""
        if device_type != "cuda":
            return Where(device_type)
        if self.compute_capability is not None:
            major, minor = self.compute_capability.split(".")
            return Where("cuda", (int(major), int(minor)))
        return Where("cuda", self.plan_gpu.compute_capability)

    def resolve(self, kernel: str | Op, S: int | None = None, SKV: int | None = None,
                device_type: str = "cuda") -> Resolved:
        """The schedule `kernel` (an op, or its name) runs with for a problem of S queries and SKV keys."""
        op = as_op(kernel)
        kernel = op.name
        if self.batch_invariant:
            S, SKV = op.tuning.canonical_shape
        db_type = self.db_type(device_type)
        by_shape = (kernel not in self.overrides and self.use_db and db_type is not None
                    and S is not None and SKV is not None and S > 0 and SKV > 0)
        bucket = bucket_of(S, SKV) if by_shape else None
        key = (kernel, bucket, db_type, device_type)
        with self._lock:
            hit = self._memo.get(key)
            if hit is None:
                hit = self._memo[key] = self._resolve(op, S, SKV, bucket, db_type, device_type)
                log.info("dsagen: %s%s uses %s (%s)", kernel, f" {bucket}" if bucket else "", hit.point, hit.source)
                if hit.stale:
                    log.info("dsagen: the tuned schedule of %s %s is stale but used: %s", kernel, bucket,
                                "; ".join(hit.stale))
        return hit

    def _resolve(self, op: Op, S, SKV, bucket, db_type, device_type) -> Resolved:
        stale: tuple[str, ...] = ()
        where = self.where(device_type)
        if op.name in self.overrides:
            choice = choose(self.spec, op, self.plan_gpu, self.backend, self.overrides[op.name], where)
            point, variant, source = choice.point, choice.variant, "override"
        else:
            found = self._lookup(op, S, SKV, db_type, where) if bucket else None
            if found is not None:
                hit, variant, point = found
                source, stale = f"{hit.source}, {hit.path}", tuple(hit.stale)
            else:
                choice = choose(self.spec, op, self.plan_gpu, self.backend, where=where)
                point, variant, source = choice.point, choice.variant, choice.source
        forced = dict(op.tuning.deterministic_knobs) if self.batch_invariant else {}
        if any(point.get(k) != v for k, v in forced.items()):
            mapping = {**point, **forced} | ({VARIANT_KEY: variant} if variant is not None else {})
            point = choose(self.spec, op, self.plan_gpu, self.backend, mapping, where).point
            source += ", " + ", ".join(f"{k}={v}" for k, v in forced.items()) + " (deterministic build)"
        return Resolved(op.name, dict(point), source, bucket, device_type, stale, variant)

    def tuned_schedule(self, op: Op, entry, where: Where) -> tuple[str | None, dict[str, int]] | None:
        """(variant, knobs) of a database entry (an older form upgraded by the op), or None where its
        variant is unknown or may not run on `where`."""
        try:
            name, knobs = recorded_schedule(op, self.backend, entry.schedule)
        except ScheduleError:
            return None
        return (name, knobs) if get_variant(op, self.backend, name).may_run(where) else None

    def _lookup(self, op: Op, S: int, SKV: int, db_type: str, where: Where):
        """(entry found, its variant, its knobs) where the tuned schedule is legal for this spec
        here and its variant may run here, else None (logged)."""
        kernel = op.name
        cc = self.compute_capability if db_type == self.gpu_type else "cpu"
        problem = problem_symbols(self.spec, op, self.plan_gpu)

        def problems(entry) -> list[str]:
            """Why an entry's schedule does not serve this spec here (empty: it does)."""
            read = self.tuned_schedule(op, entry, where)
            if read is None:
                return ["its variant is unknown or does not run here"]
            space = load_space(self.backend, op, read[0])
            try:
                space.check_names(read[1], "tuned schedule")
                return space.violations(read[1], problem)
            except ScheduleError as exc:
                return [str(exc)]

        def usable(entry) -> bool:
            read = self.tuned_schedule(op, entry, where)
            return read is not None and load_space(self.backend, op, read[0]).names_every_knob(read[1])

        found = tuning_db.lookup(kernel=kernel, backend=self.backend, spec_hash=semantic_hash(self.spec, op),
                                 S=S, SKV=SKV, gpu_type=db_type, compute_capability=cc, usable=usable,
                                 semantics=op.semantic_fields(self.spec), near_fields=op.tuning.near_fields,
                                 legal=lambda entry: not problems(entry))
        if found is None:
            return None
        variant, knobs = self.tuned_schedule(op, found.entry, where)  # type: ignore[misc]
        pinned_variant, pinned = split_variant(op, self.backend, self.spec.pinned(kernel))
        if (pinned_variant not in (None, variant)) or any(knobs.get(k) != v for k, v in pinned.items()):
            log.info("dsagen: the tuned schedule of %s in %s disagrees with the spec's pinned knobs %s: not used",
                     kernel, found.path, self.spec.pinned(kernel))
            return None
        broken = problems(found.entry)
        if broken:
            log.warning("dsagen: ignoring the tuned schedule of %s in %s: it does not fit today's search space "
                        "(%s)", kernel, found.path, "; ".join(broken))
            return None
        return found, variant, knobs
