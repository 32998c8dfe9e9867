"""One Optuna study per (kernel, spec semantic hash, shape bucket, GPU type, backend).

Small legal spaces are searched exhaustively (each legal point once, in a random order per worker so
that several workers rarely collide); large ones with TPE. Illegal points never reach a compiler:
they are told to Optuna as pruned. Every candidate is compiled, checked against the float64
reference and timed in a worker process (dsagen.tuning.worker); a wrong, crashing or hanging
candidate is one failed trial. The study lives in the storage, so running the same command again
resumes it, and several processes or hosts can add trials to it at once.

A study searches one variant of a kernel (one algorithm: its own template and search space; a
kernel that declares none has one). It starts from the schedule builds run today (the database's
answer, else the defaults), and ends with a duel: its winner and that schedule, each built as its
own variant, checked and timed in turns in one worker process. The winner is recorded (with its
`variant`) only if it wins; otherwise the database is left as it was, so tuning never makes a kernel
slower than what users already get.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..codegen import template_digest
from ..errors import DsagenError
from ..gpus import GPUS, cpu_model, get_gpu
from ..resolve import DEFAULT_GPU, Resolver
from ..plan import problem_symbols
from ..ops.base import Where
from ..schedule import get_variant, load_space, recorded_schedule, split_variant
from ..spec import VARIANT_KEY, Spec
from .. import db as tuning_db
from ..db.buckets import bucket_of
from ..ops import get_op, semantic_hash
from ..workloads import workload
from .storage import open_storage
from .worker import DUEL_ROUNDS, EVENTS_TIMING, GRAPH_TIMING, Duel, DuelOutcome, Job, Outcome, Worker

SAMPLERS = ("auto", "grid", "tpe")
GRID_MAX = 48  # legal spaces up to this size are searched exhaustively by default
TPE_FRACTION = 0.3  # default TPE budget: this share of the legal space (at least TPE_MIN trials)
TPE_MIN = 12


@dataclass
class TuneRequest:
    spec: Spec
    kernel: str
    S: int
    SKV: int
    device: str = "cuda"  # "cpu" runs the Triton interpreter: for testing the tuner, timings are not real
    gpu_type: str = DEFAULT_GPU  # the tuning database file and the study name
    trials: int | None = None  # evaluated candidates per study, all workers together
    timeout_s: float | None = None  # wall-clock limit of this process on this study
    trial_timeout_s: float = 180.0
    storage: str | None = None
    sampler: str = "auto"
    db_path: Path | None = None
    backend: str = "triton"
    seed: int = 0
    timing: dict = field(default_factory=lambda: dict(GRAPH_TIMING))
    confirm_top: int = 3  # re-time this many best points alone with CUDA events before recording
    jobs: int = 1  # worker processes on this device: they compile in parallel and time one at a time
    duel_rounds: int = DUEL_ROUNDS  # turns of the winner against the current schedule, before recording
    # the variant (algorithm) this study tunes; None: the one the spec pins, else the kernel's first
    # that may run on the device (tunable_variants lists every one a run may tune)
    variant: str | None = None


@dataclass
class TuneResult:
    study: str
    sampler: str
    legal: int
    budget: int
    evaluated: int  # counted trials in the study (all workers)
    evaluated_here: int
    failures: dict[str, int]
    best_point: dict | None
    best_ms: float | None
    db_outcome: str
    interrupted: bool = False
    # why the winner could not be recorded (a corrupt or unwritable database file), else None; the
    # study itself is kept, and `dsagen tune` goes on with the next study and exits 1 at the end
    record_error: str | None = None
    # the schedule builds ran before this study, where it came from, and its time beside the
    # winner's (best_ms) in their duel; comparison says it in one line (None: nothing to compare)
    current_point: dict | None = None
    current_source: str | None = None
    current_ms: float | None = None
    comparison: str | None = None
    variant: str | None = None  # the variant the study tuned (None: the kernel declares none)


def study_name(spec: Spec, kernel: str, backend: str, gpu_type: str, bucket: str, sampler: str,
               variant: str | None = None) -> str:
    """Names a study by everything its measurements depend on: the variant, and a changed template
    or search space starts a new study instead of resuming trials timed on other code."""
    of = f".{variant}" if variant is not None else ""
    return (f"dsagen.{kernel}{of}.{backend}.{gpu_type}.{semantic_hash(spec, kernel)}.{bucket}.{sampler}"
            f".code-{_code_fingerprint(backend, kernel, variant)}")


def _code_fingerprint(backend: str, kernel: str, variant: str | None = None) -> str:
    space = load_space(backend, kernel, variant)
    knobs = json.dumps({name: list(knob.values) for name, knob in sorted(space.knobs.items())})
    return hashlib.sha256((template_digest(backend, kernel, variant) + knobs).encode()).hexdigest()[:8]


def with_variant(variant: str | None, point: Mapping[str, int]) -> dict:
    """A study's point as a schedule mapping (an override, a database entry): its knobs, and the
    variant they are of where the kernel declares several."""
    return dict(point) if variant is None else {VARIANT_KEY: variant, **point}


def device_where(device: str, gpu_type: str) -> Where:
    """Where a run's candidates run, as a variant sees it: the CPU, or a GPU of the compute
    capability of its type (a type dsagen does not know: unknown, so no variant for one generation)."""
    if device != "cuda":
        return Where(device)
    return Where("cuda", GPUS[gpu_type].compute_capability if gpu_type in GPUS else None)


def _where_words(where: Where, gpu_type: str) -> str:
    if where.device_type != "cuda":
        return "the CPU"
    cc = where.compute_capability
    return f"{gpu_type} (compute capability {cc[0]}.{cc[1]})" if cc else f"{gpu_type} (compute capability unknown)"


def tunable_variants(spec: Spec, kernel: str, backend: str, device: str, gpu_type: str,
                     asked: list[str] | None = None) -> list[str | None]:
    """The variants of `kernel` a run tunes, one study each: those of `asked` the kernel declares
    (`dsagen tune --variant`), else the one the spec pins, else every one that may run on the
    device; [None] for a kernel of one algorithm. A variant the device cannot run, or another than
    the spec pins, is a ValueError."""
    op = get_op(kernel)
    declared = [v.name for v in op.variants_for(backend) if v.name is not None]
    if not declared:
        return [None]
    pinned, _ = split_variant(op, backend, spec.pinned(kernel))
    where = device_where(device, gpu_type)
    if asked:
        names = [n for n in asked if n in declared]
        if not names:
            raise ValueError(f"--variant {', '.join(asked)}: no variant of {kernel} ({backend}); its variants are "
                             f"{', '.join(declared)}")
    elif pinned is not None:
        names = [pinned]
    else:
        names = [v.name for v in op.runnable_variants(backend, where)]
    for name in names:
        _check_tunable(op, backend, name, pinned, where, gpu_type)
    return names


def _check_tunable(op, backend: str, name: str, pinned: str | None, where: Where, gpu_type: str) -> None:
    """A ValueError unless a study of variant `name` can run here and serve this spec."""
    variant = get_variant(op, backend, name)
    if pinned is not None and name != pinned:
        raise ValueError(f"variant={name!r}: the spec pins schedule.{op.name}.{VARIANT_KEY}={pinned!r}, the only "
                         f"variant its builds run; tune that one, or drop the pin")
    if not variant.may_run(where):
        raise ValueError(f"variant={name!r} of {op.name} cannot run on {_where_words(where, gpu_type)}: it runs on "
                         f"{variant.requirement()}")


def _study_variant(req: TuneRequest) -> str | None:
    """The variant req's study tunes (TuneRequest.variant), checked against the op, spec and device."""
    op = get_op(req.kernel)
    if req.variant is not None:
        get_variant(op, req.backend, req.variant)  # a name the op lacks: the error lists the allowed ones
    asked = [req.variant] if req.variant is not None else None
    return tunable_variants(req.spec, req.kernel, req.backend, req.device, req.gpu_type, asked)[0]


def _variant_spec(spec: Spec, kernel: str, variant: str | None) -> Spec:
    """`spec` with `variant` pinned for `kernel`: what a build of the study's variant resolves."""
    if variant is None:
        return spec
    table = {**spec.pinned(kernel), VARIANT_KEY: variant}
    return dataclasses.replace(spec, schedule={**spec.schedule, kernel: table})


def _plan_gpu(gpu_type: str) -> str:
    return gpu_type if gpu_type in GPUS else DEFAULT_GPU


def _point_key(point: dict) -> str:
    return json.dumps({k: int(v) for k, v in sorted(point.items())})


def _counted(trials) -> list:
    return [t for t in trials if t.user_attrs.get("counted") and t.state.is_finished()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_abandoned(study, trial_timeout_s: float) -> int:
    """RUNNING trials whose worker is gone (a dead pid on this host, or older than any candidate may
    run) become FAIL, so an exhaustive study re-runs their points."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    now = datetime.datetime.now()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        dead_here = attrs.get("host") == host and "pid" in attrs and not _pid_alive(int(attrs["pid"]))
        too_old = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > 2 * trial_timeout_s + 120
        if dead_here or too_old:
            try:
                study._storage.set_trial_user_attr(t._trial_id, "error", "abandoned: its worker stopped")
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                n += 1
            except Exception:  # another worker got there first
                pass
    return n


class Progress:
    """One status line per study on stderr: trials, last result, best so far, ETA."""

    def __init__(self, label: str, budget: int, stream=None, enabled: bool = True):
        self.label, self.budget, self.enabled = label, budget, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()
        self.done_here = 0

    def update(self, done: int, last: str, best_ms: float | None) -> None:
        if not self.enabled:
            return
        self.done_here += 1
        rate = (time.monotonic() - self.t0) / self.done_here
        left = max(self.budget - done, 0) * rate
        eta = time.strftime("%M:%S", time.gmtime(left)) if left < 3600 else f"{left / 3600:.1f} h"
        best = f"{best_ms:.4f} ms" if best_ms is not None else "-"
        line = f"{self.label}  {trial_count(done, self.budget)}  last: {last}  best: {best}  ETA {eta}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.done_here:
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False  # closed once: later lines start on a line of their own


def trial_count(done: int, budget: int) -> str:
    """`done` of `budget` trials ("5/6 trials"), said sensibly when a study already held more."""
    if done <= budget:
        return f"{done}/{budget} trials"
    return f"{done} trials, more than the {budget} asked (the study already held them)"


def _describe(outcome: Outcome) -> str:
    if outcome.ok:
        return f"{outcome.ms:.4f} ms"
    return f"{outcome.status}: {outcome.reason[:120]}"


class _StudyRun:
    """The trial loop one or more threads run, each driving its own worker process."""

    def __init__(self, req, study, space, legal, sampler_kind, budget, plan_gpu, fixed, first=None):
        self.req, self.study, self.space = req, study, space
        self.choices = {n: [fixed[n]] if n in fixed else list(k.values) for n, k in space.knobs.items()}
        self.legal_keys = {_point_key(p): p for p in legal}
        self.order = list(self.legal_keys)
        random.Random(os.getpid()).shuffle(self.order)  # workers of one grid study start apart
        if first is not None and _point_key(first) in self.legal_keys:  # a grid starts where builds are
            self.order.remove(_point_key(first))
            self.order.insert(0, _point_key(first))
        self.sampler_kind, self.budget, self.plan_gpu = sampler_kind, budget, plan_gpu
        self.deadline = time.monotonic() + req.timeout_s if req.timeout_s else None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.failures: dict[str, int] = {}
        self.errors: list[BaseException] = []
        self.evaluated_here = 0
        self.skipped = 0
        self.interrupted = False

    def _next_trial(self):
        """Under the lock: a new trial with a legal, untried point, or None when the study is done."""
        from optuna.trial import TrialState

        study = self.study
        while not self.stop.is_set():
            _fail_abandoned(study, self.req.trial_timeout_s)
            trials = study.get_trials(deepcopy=False)
            counted = _counted(trials)
            if len(counted) >= self.budget or (self.deadline and time.monotonic() > self.deadline):
                return None
            tried = {t.user_attrs.get("point") for t in counted}
            running = {t.user_attrs.get("point") for t in trials if t.state == TrialState.RUNNING}
            if len(counted) + len(running) >= self.budget:
                return "wait"
            if self.sampler_kind == "grid":
                pending = [k for k in self.order if k not in tried and k not in running]
                if not pending:
                    return "wait" if running else None
                study.enqueue_trial(self.legal_keys[pending[0]], skip_if_exists=False)
            trial = study.ask()
            point = {n: trial.suggest_categorical(n, values) for n, values in self.choices.items()}
            key = _point_key(point)
            if key not in self.legal_keys or key in tried or key in running:
                trial.set_user_attr("skipped", "illegal" if key not in self.legal_keys else "already tried")
                study.tell(trial, state=TrialState.PRUNED)
                self.skipped += 1
                if self.skipped > 50 * self.budget:  # TPE keeps proposing what was tried: converged
                    return None
                continue
            trial.set_user_attr("point", key)
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            return trial, point
        return None

    def loop(self, worker: Worker, bar: Progress) -> None:
        try:
            self._loop(worker, bar)
        except BaseException as exc:  # surfaced by tune_kernel in the main thread
            self.errors.append(exc)
            self.stop.set()

    def _loop(self, worker: Worker, bar: Progress) -> None:
        from optuna.trial import TrialState

        req, study = self.req, self.study
        while not self.stop.is_set():
            with self.lock:
                nxt = self._next_trial()
            if nxt is None:
                return
            if nxt == "wait":  # the last points are with other workers
                time.sleep(1)
                continue
            trial, point = nxt
            job = Job(req.spec.to_dict(), req.kernel, with_variant(req.variant, point), req.S, req.SKV, req.device,
                      seed=req.seed * 100003 + trial.number, plan_gpu=self.plan_gpu, backend=req.backend,
                      timing=dict(req.timing))
            outcome = worker.run(job, req.trial_timeout_s)
            with self.lock:
                if self.stop.is_set() and not outcome.ok:  # killed by Ctrl-C: not a verdict
                    trial.set_user_attr("error", "interrupted (Ctrl-C)")
                    study.tell(trial, state=TrialState.FAIL)
                    return
                trial.set_user_attr("counted", True)
                trial.set_user_attr("status", outcome.status)
                if outcome.compile_s is not None:
                    trial.set_user_attr("compile_s", round(outcome.compile_s, 3))
                self.evaluated_here += 1
                if outcome.ok:
                    trial.set_user_attr("check", outcome.check)
                    study.tell(trial, outcome.ms)
                else:
                    self.failures[outcome.status] = self.failures.get(outcome.status, 0) + 1
                    trial.set_user_attr("error", outcome.reason[:1000])
                    study.tell(trial, state=TrialState.FAIL)
                done = len(_counted(study.get_trials(deepcopy=False)))
                bar.update(done, _describe(outcome), _best_ms(study))


def tune_kernel(req: TuneRequest, progress: bool = True, workers: list[Worker] | None = None) -> TuneResult:
    """Run (or resume) the study of one kernel at one shape; record its best in the tuning DB.

    workers: a pool to reuse across studies (their processes stay warm); default req.jobs new ones.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if req.sampler not in SAMPLERS:
        raise ValueError(f"sampler={req.sampler!r}: allowed {', '.join(SAMPLERS)}")
    if req.trials is not None and req.trials < 1:
        raise ValueError(f"trials={req.trials}: must be >= 1")
    plan_gpu = _plan_gpu(req.gpu_type)
    op = get_op(req.kernel)
    req = dataclasses.replace(req, variant=_study_variant(req))
    space = load_space(req.backend, op, req.variant)
    _, pinned = split_variant(op, req.backend, req.spec.pinned(req.kernel))  # the knobs; never the variant
    space.check_names(pinned, f"schedule.{req.kernel}")
    # what a build of this variant would run untuned (the one resolver, database left out): legal, the pins kept
    untuned = Resolver(_variant_spec(req.spec, req.kernel, req.variant), req.backend, plan_gpu,
                       use_db=False).resolve(req.kernel, device_type=req.device)
    fixed = fixed_knobs(space, req.device, untuned.point) | pinned  # the pins; the other target's knobs
    legal = [p for p in space.legal_points(problem_symbols(req.spec, op, get_gpu(plan_gpu)))
             if all(p[k] == v for k, v in fixed.items())]
    if not legal:
        schedule_file = f"schedules/{req.backend}/{op.variant(req.backend, req.variant).schedule}.toml"
        raise ValueError(f"{req.kernel}: no legal schedule in {schedule_file} "
                         f"for this spec on {plan_gpu}" + (f" with the pinned knobs {pinned}" if pinned else ""))
    sampler_kind = req.sampler if req.sampler != "auto" else ("grid" if len(legal) <= GRID_MAX else "tpe")
    default_budget = len(legal) if sampler_kind == "grid" else max(TPE_MIN, math.ceil(TPE_FRACTION * len(legal)))
    budget = min(req.trials or default_budget, len(legal))
    bucket = bucket_of(*workload(req.kernel).call_shape(req.S, req.SKV))  # where a build will look it up
    name = study_name(req.spec, req.kernel, req.backend, req.gpu_type, bucket, sampler_kind, req.variant)
    if pinned:  # a smaller space is a different study
        name += ".pinned-" + "-".join(f"{k}{v}" for k, v in sorted(pinned.items()))
    sampler = (optuna.samplers.TPESampler(seed=None, n_startup_trials=min(8, budget), multivariate=True)
               if sampler_kind == "tpe" else optuna.samplers.RandomSampler())
    study = optuna.create_study(study_name=name, storage=open_storage(req.storage), sampler=sampler,
                                direction="minimize", load_if_exists=True)
    study.set_user_attr("kernel", req.kernel)
    study.set_user_attr("variant", req.variant)
    study.set_user_attr("shape", {"S": req.S, "SKV": req.SKV})
    study.set_user_attr("spec", req.spec.to_dict())
    study.set_user_attr("legal_points", len(legal))

    current = _built(req)
    built_point = current.point if _of_variant(current, req.variant) else None  # a start only in this space
    if sampler_kind == "tpe" and not _counted(study.get_trials(deepcopy=False)):
        for point in _seed_points(req, legal, untuned.point, built_point):
            study.enqueue_trial(point, skip_if_exists=True)
    run = _StudyRun(req, study, space, legal, sampler_kind, budget, plan_gpu, fixed, first=built_point)
    bar = Progress(f"[{_shape_label(req)} {sampler_kind}]", budget, enabled=progress)
    own_workers = workers is None
    workers = workers if workers is not None else [Worker() for _ in range(max(1, req.jobs))]
    threads = [threading.Thread(target=run.loop, args=(w, bar), daemon=True) for w in workers]
    try:
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            run.stop.set()
            run.interrupted = True
            for w in workers:
                w.kill()
            for t in threads:
                t.join(30)
        if run.errors:
            raise run.errors[0]
        failures, evaluated_here, interrupted = run.failures, run.evaluated_here, run.interrupted
        best_point, best_ms = _confirm(req, study, workers[0], plan_gpu, interrupted, progress)
        bar.close()
        verdict = _judge(req, study, workers[0], plan_gpu, current, best_point, best_ms, fixed, interrupted,
                         progress)
    finally:
        bar.close()
        if own_workers or run.interrupted:
            for w in workers:
                w.close()
    evaluated = len(_counted(study.get_trials(deepcopy=False)))
    record_error = None
    db_outcome = verdict.outcome
    if verdict.record:
        best_ms = verdict.ms
        best_point = verdict.point if verdict.point is not None else with_variant(req.variant, best_point)
        try:
            db_outcome = _record(req, name, sampler_kind, best_point, best_ms, evaluated, verdict.beaten)
        except (tuning_db.TuningDBError, OSError, ValueError) as exc:  # the measurements stay in the study
            record_error = f"{req.kernel} S={req.S} SKV={req.SKV}: the winner was not recorded: {exc}"
            db_outcome = f"NOT RECORDED: {exc}"
    elif verdict.ms is not None:
        best_ms = verdict.ms
    return TuneResult(name, sampler_kind, len(legal), budget, evaluated, evaluated_here, failures, best_point,
                      best_ms, db_outcome, interrupted, record_error,
                      _mapping_of(current) if current is not None else None,
                      current.source if current is not None else None, verdict.current_ms, verdict.comparison,
                      req.variant)


def _mapping_of(current) -> dict:
    """The current schedule (a Resolved) as a schedule mapping: its knobs and its variant."""
    return with_variant(getattr(current, "variant", None), current.point)


def _of_variant(current, variant: str | None) -> bool:
    """Whether the current schedule is a point of the study's variant (its space, its template)."""
    return current is not None and getattr(current, "variant", None) == variant


def study_label(kernel: str, variant: str | None) -> str:
    """How output names a study's kernel: with its variant where the kernel declares several."""
    return kernel if variant is None else f"{kernel} {VARIANT_KEY}={variant}"


def _shape_label(req: TuneRequest) -> str:
    """How progress lines name a study: the kernel (and variant) at the shape asked for (a decode
    workload's S requests, not the S * next_n rows of the call its bucket is named by)."""
    return f"{study_label(req.kernel, req.variant)} S{req.S}-SKV{req.SKV}"


TARGET_KNOB_PREFIXES = {"cpu": "cpu_", "cuda": "cuda_"}


def fixed_knobs(space, device: str, around: Mapping[str, int] | None = None) -> dict[str, int]:
    """Knobs that only matter on the other target (named cpu_* / cuda_*), held fixed: at their values
    in `around`, else at their defaults.

    A raw default can be illegal for a spec (cuda_block_h=8 with 3 heads), and then no point of the
    tuned target would be legal; tune_kernel passes the untuned point the resolver returns, which moves illegal
    defaults to the nearest legal point.
    """
    other = [p for d, p in TARGET_KNOB_PREFIXES.items() if d != device]
    base = space.default_point() | dict(around or {})
    return {n: int(base[n]) for n in space.knobs if any(n.startswith(p) for p in other)}


def _db_file(req: TuneRequest) -> Path:
    return Path(req.db_path) if req.db_path is not None else tuning_db.db_path(req.gpu_type)


def check_db_file(path: Path | None, gpu_type: str) -> Path:
    """The tuning-database file a run on `gpu_type` records in (`path`, default the user's file of
    that type), checked before any study starts: named <gpu_type>.json, loadable (or absent, in a
    folder that exists or can be made, and is writable). Raises TuningDBError saying what is wrong."""
    where = f"--db {path}" if path is not None else f"the tuning database {tuning_db.db_path(gpu_type)}"
    path = Path(path) if path is not None else tuning_db.db_path(gpu_type)
    if path.name != f"{gpu_type}.json":
        raise tuning_db.TuningDBError(
            f"{where}: this run tunes on {gpu_type}, whose tuning database must be a file named "
            f"{gpu_type}.json (the file name is the GPU type a build looks up)")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # recording makes the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise tuning_db.TuningDBError(f"{where}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise tuning_db.TuningDBError(f"{where}: cannot write in {folder} (no permission)")
    if path.is_dir():
        raise tuning_db.TuningDBError(f"{where}: is a folder, not a tuning-database file")
    try:
        tuning_db.load(path)  # TuningDBError names the file and line at fault
    except OSError as exc:
        raise tuning_db.TuningDBError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    return path


def _built(req: TuneRequest):
    """What a build of this spec runs at this shape today (a Resolved: point and source), the tuning
    databases a build reads included (an entry of the nearest tuned head count, say); None if no
    build could resolve it. A study starts from it and its winner must beat it to be recorded."""
    try:
        S_, SKV_ = workload(req.kernel).call_shape(req.S, req.SKV)
        return Resolver(req.spec, req.backend, req.gpu_type).resolve(req.kernel, S_, SKV_, req.device)
    except DsagenError:
        return None


def _built_point(req: TuneRequest) -> dict | None:
    """The point of _built: where a study starts."""
    built = _built(req)
    return built.point if built is not None else None


def _seed_points(req: TuneRequest, legal: list[dict], untuned: dict, built: dict | None = None) -> list[dict]:
    """Where TPE starts: the schedule a build runs now (`built`: the database's answer, which may
    come from a neighbouring head count), the one it would use untuned, then the winners of this
    kernel at other shape buckets on this GPU type (a good schedule at one shape is a good guess at
    the next); only points of the study's variant (`built` must be one already)."""
    legal_keys = {_point_key(p) for p in legal}
    seeds = ([built] if built else []) + [untuned]
    try:
        entries = tuning_db.load(_db_file(req)).entries.values()
    except (tuning_db.TuningDBError, OSError):
        entries = []
    spec_hash = semantic_hash(req.spec, req.kernel)
    seeds += [knobs for e in sorted(entries, key=lambda e: e.ms)
              if (e.kernel, e.backend, e.spec_hash) == (req.kernel, req.backend, spec_hash)
              for variant, knobs in [_entry_schedule(req, e)] if variant == req.variant]
    out, seen = [], set()
    for p in seeds:
        key = _point_key(p)
        if key in legal_keys and key not in seen:
            seen.add(key)
            out.append({k: int(v) for k, v in p.items()})
    return out[:4]


def _entry_schedule(req: TuneRequest, entry) -> tuple[str | None, dict]:
    """(variant, knobs) of a database entry of req's kernel; ("", {}) for a variant it lacks."""
    try:
        return recorded_schedule(get_op(req.kernel), req.backend, entry.schedule)
    except DsagenError:
        return "", {}


def _confirm(req: TuneRequest, study, worker: Worker, plan_gpu: str, interrupted: bool, progress: bool = True):
    """(point, ms): the study's best, re-timed alone (fresh inputs, checked again; CUDA events, or
    graph replays for an op timed that way) among its top `confirm_top` points on CUDA; the
    search's own best on the CPU."""
    from optuna.trial import TrialState

    done = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None),
                  key=lambda t: t.value)
    if not done:
        return None, None
    if req.device != "cuda" or interrupted or req.confirm_top < 1:
        return json.loads(done[0].user_attrs["point"]), float(done[0].value)
    top, seen = [], set()
    for t in done:
        if t.user_attrs["point"] not in seen:
            seen.add(t.user_attrs["point"])
            top.append(json.loads(t.user_attrs["point"]))
        if len(top) == req.confirm_top:
            break
    timed = []
    confirm_timing = GRAPH_TIMING if get_op(req.kernel).tuning.timing == "graph" else EVENTS_TIMING
    for i, point in enumerate(top):
        job = Job(req.spec.to_dict(), req.kernel, with_variant(req.variant, point), req.S, req.SKV, req.device,
                  seed=req.seed * 100003 + 7919 + i,
                  plan_gpu=plan_gpu, backend=req.backend, timing=dict(confirm_timing))
        outcome = worker.run(job, req.trial_timeout_s)
        if outcome.ok:
            timed.append((outcome.ms, point))
        if progress:  # say what the confirmation saw: a dropped point would otherwise vanish silently
            print(f"[{_shape_label(req)}] confirm {point}: {_describe(outcome)}", file=sys.stderr, flush=True)
    if not timed:
        return json.loads(done[0].user_attrs["point"]), float(done[0].value)
    ms, point = min(timed, key=lambda x: x[0])
    return point, ms


@dataclass
class Verdict:
    """What the end of a study decides: record the winner (at `ms`) or leave the database as it is
    (`outcome` says why); `comparison` is the before/after line, `current_ms` the current
    schedule's time in the duel, `beaten` the current schedule when the winner beat it there."""

    record: bool
    ms: float | None = None
    outcome: str = ""
    comparison: str | None = None
    current_ms: float | None = None
    beaten: dict | None = None
    point: dict | None = None  # the schedule to record when it is not the winner (a borrowed one that stayed)


def _judge(req: TuneRequest, study, worker, plan_gpu: str, current, winner: dict | None, winner_ms: float | None,
           fixed: Mapping[str, int], interrupted: bool, progress: bool = True) -> Verdict:
    """Whether the study's winner goes to the database: only if it beats the schedule builds run
    today (`current`, a Resolved) in a duel. A study's own times cannot decide that: the current
    schedule may have been timed first, on a machine still warming up, or under other load."""
    if winner is None:
        return Verdict(False, outcome="nothing recorded: no candidate passed its check")
    if interrupted:
        return Verdict(False, outcome="nothing recorded: interrupted before the winner met the current schedule "
                                      "(the same command resumes the study and compares them)")
    if current is None:  # builds cannot resolve this kernel today: anything that passed is better
        return Verdict(True, winner_ms, comparison=f"no current schedule to compare with; winner {winner_ms:.4f} ms")
    if _of_variant(current, req.variant) and _same_schedule(current.point, winner, fixed):
        comparison = f"the winner is the current schedule ({current.source}): {winner_ms:.4f} ms"
        if _from_own_database(current.source):
            return Verdict(False, winner_ms, "nothing recorded: the winner is the schedule builds already run",
                           comparison, winner_ms)
        return Verdict(True, winner_ms, comparison=comparison, current_ms=winner_ms)
    failed = _failed_check(study, current.point) if _of_variant(current, req.variant) else None
    if failed is not None:
        return Verdict(True, winner_ms, comparison=f"the current schedule ({current.source}) failed in this study "
                                                   f"({failed}); winner {winner_ms:.4f} ms", beaten=_mapping_of(current))
    return _duel(req, worker, plan_gpu, current, winner, winner_ms, progress)


def _duel(req: TuneRequest, worker, plan_gpu: str, current, winner: dict, winner_ms: float,
           progress: bool) -> Verdict:
    """The current schedule and the winner, checked and timed in turns in one worker process, each
    built as its own variant (the current schedule may be another algorithm than the study's)."""
    timing = GRAPH_TIMING if get_op(req.kernel).tuning.timing == "graph" else EVENTS_TIMING
    sides = (_mapping_of(current), with_variant(req.variant, winner))
    job = Duel(req.spec.to_dict(), req.kernel, sides, req.S, req.SKV, req.device,
               seed=req.seed * 100003 + 7907, plan_gpu=plan_gpu, backend=req.backend, timing=dict(timing),
               rounds=req.duel_rounds)
    if progress:
        print(f"[{_shape_label(req)}] duel: the winner against the current schedule ({current.source}), "
              f"{req.duel_rounds} rounds in turns", file=sys.stderr, flush=True)
    result = worker.run(job, 3 * req.trial_timeout_s)  # two compiles and checks, then the rounds
    if not isinstance(result, DuelOutcome):
        return Verdict(False, outcome=f"nothing recorded: the duel with the current schedule did not finish "
                                      f"({_describe(result)})")
    now, new = result.sides
    if not new.ok:
        return Verdict(False, outcome=f"nothing recorded: the winner failed its duel ({_describe(new)})")
    if not now.ok:
        return Verdict(True, winner_ms, comparison=f"the current schedule ({current.source}) failed its duel "
                                                   f"({_describe(now)}); winner {winner_ms:.4f} ms",
                       beaten=_mapping_of(current))
    wins = sum(w < c for c, w in result.rounds)
    how = (f"timed in turns in one process, median of {len(result.rounds)} rounds; the winner faster in {wins} of "
           f"{len(result.rounds)}")
    comparison = f"current schedule {now.ms:.4f} ms, winner {new.ms:.4f} ms ({how})"
    if new.ms < now.ms and wins >= _rounds_to_win(len(result.rounds)):
        return Verdict(True, new.ms, comparison=comparison + ": the winner is recorded", current_ms=now.ms,
                       beaten=_mapping_of(current))
    if _borrowed(current.source):  # measured here now: this GPU type gets its own entry
        return Verdict(True, now.ms, comparison=comparison + f": the current schedule stays, recorded for "
                       f"{req.gpu_type} at its time here", current_ms=now.ms, point=_mapping_of(current))
    return Verdict(False, new.ms, f"nothing recorded: the current schedule ({current.source}) stays",
                   comparison + ": the current schedule stays", now.ms)


ROUNDS_TO_WIN = 0.75  # share of a duel's rounds the winner must win, besides the median


def _rounds_to_win(rounds: int) -> int:
    """Rounds the winner must be faster in (4 of 5): a lower median alone is a coin toss between
    two equal schedules on a busy machine, and each round compares two adjacent turns."""
    return math.ceil(ROUNDS_TO_WIN * rounds)


def _same_schedule(a: Mapping[str, int], b: Mapping[str, int], fixed: Mapping[str, int]) -> bool:
    """Whether two points make the same kernel here: equal on every knob the study tuned (the knobs
    it held fixed, the pins and the other target's, do not change this target's kernel)."""
    tuned = set(a) | set(b)
    return all(int(a.get(k, -1)) == int(b.get(k, -1)) for k in tuned - set(fixed))


def _from_own_database(source: str) -> bool:
    """Whether the current schedule came from this GPU type's own entries ("tuned (...)"), not from a
    sibling of the same compute capability ("tuned on <type> ...") nor from defaults: a schedule
    borrowed from another GPU type and confirmed by a study here is recorded for this type."""
    return source.startswith("tuned") and not _borrowed(source)


def _borrowed(source: str) -> bool:
    """Whether the current schedule is another GPU type's entry (same compute capability)."""
    return source.startswith("tuned on ")


def _failed_check(study, point: Mapping[str, int]) -> str | None:
    """How this study's trial of `point` failed (wrong, crashed, timeout), if it did and none passed.
    An error (compile or launch: say, out of memory beside the other workers) may be the machine's
    doing, not the schedule's: the duel decides those."""
    key = _point_key(dict(point))
    mine = [t for t in _counted(study.get_trials(deepcopy=False)) if t.user_attrs.get("point") == key]
    if not mine or any(t.user_attrs.get("status") == "ok" for t in mine):
        return None
    status = mine[-1].user_attrs.get("status")
    if status == "error":
        return None
    return f"{status}: {str(mine[-1].user_attrs.get('error', ''))[:120]}"


def _best_trial(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return min(done, key=lambda t: t.value) if done else None


def _best_ms(study) -> float | None:
    best = _best_trial(study)
    return best.value if best else None


def _device_facts(device: str, backend: str) -> tuple[str, str]:
    """(device name, compute capability) of an entry: the GPU's, or on the CPU what ran the
    candidates: TVM's llvm kernels (real times) or the Triton interpreter (times that mean nothing)."""
    import torch

    if device == "cuda":
        major, minor = torch.cuda.get_device_capability(0)
        return torch.cuda.get_device_name(0), f"{major}.{minor}"
    if backend == "triton":
        return "cpu (Triton interpreter)", "cpu"
    if backend == "tvm":
        return f"cpu (TVM llvm, {cpu_model()})", "cpu"
    return f"cpu ({backend}, {cpu_model()})", "cpu"


def _record(req: TuneRequest, name: str, sampler_kind: str, point: dict, ms: float, evaluated: int,
            beaten: dict | None = None) -> str:
    """Record `point` (a schedule mapping: its knobs and, where the kernel has several, its variant)."""
    from ..workloads import rates as workload_rates

    rates = workload_rates(req.spec, req.kernel, req.S, req.SKV, ms, get_gpu(_plan_gpu(req.gpu_type)))
    device_name, cc = _device_facts(req.device, req.backend)
    # the database is keyed by the shape of the call (a decode workload of S requests calls with
    # S * next_n rows), which is also the shape the entry records
    call_S, call_SKV = workload(req.kernel).call_shape(req.S, req.SKV)
    entry = tuning_db.Entry(
        kernel=req.kernel, backend=req.backend, spec_hash=semantic_hash(req.spec, req.kernel),
        bucket=bucket_of(call_S, call_SKV), shape={"S": call_S, "SKV": call_SKV},
        schedule=point, ms=ms, tflops=rates["tflops"], gbps=rates["gbps"],
        # a roofline floor is a GPU's: a CPU entry has none
        pct_of_roofline=rates["pct_of_roofline"] if req.device == "cuda" else None,
        gpu_type=req.gpu_type, device_name=device_name,
        compute_capability=cc, date=datetime.date.today().isoformat(), versions=tuning_db.running_versions(),
        trials=evaluated, sampler=sampler_kind, study=name,
        semantics=tuning_db.recordable_semantics(get_op(req.kernel).semantic_fields(req.spec)))
    path = _db_file(req)
    return f"{path}: {tuning_db.record(path, entry, beaten=beaten)}"
