"""Evaluating one candidate schedule in a worker process: render, compile, check, time.

A candidate may crash its process (an illegal memory access poisons the CUDA context; a segfault
kills it) or hang. Each worker is a separate spawned process that evaluates candidates one after
another, keeping Triton's compile cache warm; the parent gives every candidate a time limit, and a
crash or a timeout costs that one trial: the worker is killed and a fresh one starts for the next.
A fresh worker first imports what it needs and says it is ready; only then does a candidate's time
limit start, so a slow process start on a busy CPU is never mistaken for a hanging candidate.

A worker also runs the end of a study's duel (Duel): the study's winner and the schedule builds
run today, both checked, then timed in turns in this one process, so that the winner is recorded
only where it is faster than what users already get.

A worker never outlives the process that started it: a thread in the worker watches its parent
and ends the worker once the parent is gone (a `kill -9`), even in the middle of a candidate.
"""
from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from ..fileio import make_dirs
from ..timing import cpu_ms, cuda_events_ms, cuda_graph_ms, calls_ms, interleaved_ms

_CUDA_FATAL = ("illegal memory access", "CUDA error", "unspecified launch failure", "misaligned address",
               "device-side assert", "an illegal instruction")


# a (re)started worker process's imports (torch, triton, dsagen) must end within this, apart from the
# candidate's own time limit
STARTUP_TIMEOUT_S = 600.0

GRAPH_TIMING = {"mode": "graph", "rep": 100}
EVENTS_TIMING = {"mode": "events", "warmup": 100, "rep": 500}


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, as plain data (it crosses a process boundary)."""

    spec: dict
    kernel: str
    point: dict  # a schedule mapping: knob -> value, and "variant" -> the algorithm where there are several
    S: int
    SKV: int
    device: str  # "cuda", or "cpu" (TVM's llvm kernels; for Triton the interpreter, to test the tuner)
    seed: int  # fresh inputs per trial
    plan_gpu: str  # GPU type whose limits the schedule was checked against
    backend: str = "triton"
    check_rows: int = 6
    # "graph": CUDA-graph replay (no host overhead, so busy CPUs of parallel compiles cannot inflate
    # a time; the search); "events": do_bench's CUDA events with L2 flushes (the confirmation, and
    # what `dsagen bench` reports)
    timing: dict = field(default_factory=lambda: dict(GRAPH_TIMING))


@dataclass
class Outcome:
    status: str  # "ok", "wrong" (checked and rejected), "error" (compile/launch), "crashed", "timeout"
    ms: float | None = None
    reason: str = ""
    check: str = ""
    compile_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


DUEL_ROUNDS = 5  # rounds of a duel: each side timed once per round, in turns
CPU_ROUND_MS = 20.0  # on the CPU a side's turn lasts about this long at least (short kernels: several calls)


@dataclass(frozen=True)
class Duel:
    """Two schedules of one kernel at one shape, checked and then timed in turns in one process.

    points[0] is the schedule builds run today, points[1] the study's winner, each a schedule
    mapping built as its own variant (the two may be different algorithms); each is checked
    against the reference on its own fresh inputs (the same seed) before any timing."""

    spec: dict
    kernel: str
    points: tuple[dict, dict]
    S: int
    SKV: int
    device: str
    seed: int
    plan_gpu: str
    backend: str = "triton"
    check_rows: int = 6
    timing: dict = field(default_factory=lambda: dict(EVENTS_TIMING))  # per round on CUDA
    rounds: int = DUEL_ROUNDS


@dataclass
class DuelOutcome:
    """Per side of a Duel: its Outcome, with the median of its rounds as ms when both passed;
    `rounds` holds every round's time (side by side), to show how far the turns agreed."""

    sides: list[Outcome]
    rounds: list[list[float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(side.ok for side in self.sides)

    @classmethod
    def from_dict(cls, data: dict) -> "DuelOutcome":
        return cls([Outcome(**side) for side in data["sides"]], [list(r) for r in data["rounds"]])


def _is_cuda_fatal(outcome) -> bool:
    """An error that leaves this process's CUDA context unusable: the worker must not go on."""
    sides = outcome.sides if isinstance(outcome, DuelOutcome) else [outcome]
    return any(s.status == "error" and any(m in s.reason for m in _CUDA_FATAL) for s in sides)


def _warm_up() -> None:
    """Import what evaluate needs before the worker says it is ready, so that a candidate's time
    limit is spent on the candidate, not on this process's imports (seconds on a busy CPU)."""
    import torch  # noqa: F401

    from .. import backends  # noqa: F401
    from ..backends.source_cache import materialize  # noqa: F401
    from ..resolve import Resolver  # noqa: F401
    from ..verify import Mismatch  # noqa: F401
    from ..workloads import workload  # noqa: F401


def _checked_call(job, point: dict) -> tuple[Outcome, Callable[[], object] | None]:
    """Render, compile and run `point` once on fresh inputs (job.seed) into poisoned outputs, and
    check the result: (an "ok" Outcome and the call to time) or (the failure, None)."""
    import torch

    from .. import backends
    from ..backends.source_cache import materialize
    from ..resolve import Resolver
    from ..spec import spec_from_dict
    from ..verify import Mismatch
    from ..codegen import generate
    from ..ops import get_op
    from ..workloads import sample_rows, workload

    spec = spec_from_dict(job.spec)
    t0 = time.perf_counter()
    try:
        op, recipe = get_op(job.kernel), workload(job.kernel)
        resolver = Resolver(spec, job.backend, job.plan_gpu, overrides={job.kernel: point})
        path = materialize(generate(spec, op, resolver.resolve(op, device_type=job.device), job.backend))
        fn = backends.launcher(job.backend, path, job.kernel, job.device)
        inputs = recipe.inputs(spec, job.S, job.SKV, job.device, job.seed)
        outs = recipe.poisoned_outputs(spec, inputs)
        result = fn(*inputs, **outs)  # the first call compiles
        if job.device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # compile errors, out of resources, launch failures
        return Outcome("error", reason=f"{type(exc).__name__}: {_first_line(exc)}"), None
    compile_s = time.perf_counter() - t0
    try:
        checked = recipe.check(spec, inputs, result, sample_rows(job.S, job.check_rows, job.seed))
    except Mismatch as exc:
        return Outcome("wrong", reason=f"rejected, wrong result: {exc}", compile_s=compile_s), None

    def run():
        return fn(*inputs, **outs)

    return Outcome("ok", check=checked, compile_s=compile_s), run


def evaluate(job: Job) -> Outcome:
    """Run one candidate in this process. Wrong results and Python-level errors become Outcomes."""
    outcome, run = _checked_call(job, job.point)
    if run is None:
        return outcome
    with _timing_lock(job.device):  # workers compile and check concurrently but time one at a time
        if job.device == "cuda":
            opts = {k: v for k, v in job.timing.items() if k != "mode"}
            timer = cuda_graph_ms if job.timing.get("mode") == "graph" else cuda_events_ms
            outcome.ms = timer(run, **opts)
        else:  # CPU: the TVM backend's real time, or the Triton interpreter's (meaningless but real)
            outcome.ms = cpu_ms(run, reps=5 if job.backend == "tvm" else 3)
    return outcome


def duel(job: Duel) -> DuelOutcome:
    """Check both schedules of `job`, then time them in turns (timing.interleaved_ms); each side's
    ms is the median of its rounds. A side that fails its check leaves both untimed."""
    sides, runs = zip(*(_checked_call(job, point) for point in job.points))
    sides = list(sides)
    if not all(side.ok for side in sides):
        return DuelOutcome(sides)
    with _timing_lock(job.device):
        timer = _round_timer(job, runs)
        rounds = interleaved_ms(list(runs), job.rounds, timer)
    for side, times in zip(sides, rounds):
        side.ms = statistics.median(times)
    return DuelOutcome(sides, [list(r) for r in zip(*rounds)])


def _round_timer(job: Duel, runs) -> Callable[[Callable[[], object]], float]:
    """How one side's turn is timed: CUDA events (or graph replays) as `job.timing` says on a GPU;
    on the CPU the median of enough calls that a turn lasts CPU_ROUND_MS, the same count for both
    sides (sized from one call of each, which also warms them up)."""
    if job.device == "cuda":
        opts = {k: v for k, v in job.timing.items() if k != "mode"}
        base = cuda_graph_ms if job.timing.get("mode") == "graph" else cuda_events_ms
        return lambda fn: base(fn, **opts)
    fastest = min(calls_ms(run) for run in runs)
    calls = max(1, min(50, math.ceil(CPU_ROUND_MS / max(fastest, 1e-3))))
    return lambda fn: calls_ms(fn, calls)


def _timing_lock(device: str = "cuda"):
    """Who times must be alone: one lock per visible GPU, or one for the CPU, shared by every
    worker process of this host (and every `dsagen tune` using this cache folder)."""
    from ..fileio import cache_dir, file_lock

    if device != "cuda":
        return file_lock(cache_dir() / "tuning" / "timing-cpu.lock")
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "_") or "none"
    return file_lock(cache_dir() / "tuning" / f"timing-gpu-{gpus}.lock")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if len(lines) > 3 else " ".join(lines))[:400]


READY = "ready"  # the worker's first message: imports done, jobs welcome

# Test hook, set only by tests (test_tune.py and test_tune_worker.py document it):
# DSAGEN_TEST_HOLD_JOB="<n>:<file>" makes a worker process, on receiving its n-th job, write its pid
# to <file> and then hold that job like a candidate that computes for ever: it never evaluates it
# and never reads its pipe, so only a kill (its parent's, after Ctrl-C or a time limit) or the
# parent watch ends it. A test thereby knows for certain that a trial is in flight when it
# interrupts or kills the tuning process, however fast the machine runs the other trials. Tuning
# never sets it.
HOLD_ENV = "DSAGEN_TEST_HOLD_JOB"

PARENT_WATCH_S = 0.2  # how often a worker looks whether its parent is still there


def _hold_if_asked(served: int) -> None:
    value = os.environ.get(HOLD_ENV)
    if not value:
        return
    n, _, path = value.partition(":")
    if not n.isdigit() or int(n) != served or not path:
        return
    Path(path).write_text(f"{os.getpid()}\n")
    while True:  # busy with the candidate, as far as anyone can tell
        time.sleep(1.0)


def _exit_with_parent(parent_pid: int) -> None:
    """End this process as soon as `parent_pid` is no longer its parent (it died and the worker was
    handed to init or a subreaper): a candidate may compute for minutes, and an orphan would hold
    the GPU or the CPU's timing lock meanwhile.

    A thread that polls getppid rather than prctl(PR_SET_PDEATHSIG): Linux sends that signal when
    the *thread* that started the child ends, and workers are started from a study's threads,
    which end after every study while the pool of workers lives on. Polling works on every POSIX
    system; it needs the GIL, which long kernels and compiles release or give up between calls.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_WATCH_S)
        os._exit(3)

    threading.Thread(target=watch, name="dsagen-parent-watch", daemon=True).start()


def _serve(recv: Connection, send: Connection) -> None:
    """Worker main loop: receive Jobs and Duels, send their outcomes; exit after a CUDA error (the
    context is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        _warm_up()
    except Exception:  # evaluate meets the same error and reports it as the candidate's
        pass
    send.send(READY)
    served = 0
    while True:
        try:
            job = recv.recv()
        except EOFError:
            return
        if job is None:
            return
        served += 1
        _hold_if_asked(served)
        try:
            outcome = duel(job) if isinstance(job, Duel) else evaluate(job)
        except Exception as exc:  # a bug outside the candidate's own code path
            outcome = Outcome("error", reason=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
        send.send(asdict(outcome))
        if _is_cuda_fatal(outcome):
            return


class Worker:
    """An evaluation process (`python -m dsagen.tuning.worker`), restarted after a crash or a timeout.

    A plain subprocess rather than multiprocessing's spawn, so that nothing of the caller's main
    module is re-imported; jobs and outcomes travel as pickles over a pair of pipes, and the child's
    own output goes to a log whose tail explains a crash.
    """

    def __init__(self, env: dict[str, str] | None = None, log_dir: Path | None = None):
        self.env = env or {}
        self.log_dir = log_dir
        self._proc: subprocess.Popen | None = None
        self._send = self._recv = None
        self._log = None
        self.restarts = 0

    def _start(self) -> None:
        from ..fileio import cache_dir

        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = {**os.environ, **self.env}
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        log_dir = self.log_dir or cache_dir() / "tuning" / "logs"
        make_dirs(log_dir)
        self._log = log_dir / f"worker-{os.getpid()}-{self.restarts}.log"
        with open(self._log, "w") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "dsagen.tuning.worker", str(to_child_r), str(from_child_w),
                 str(os.getpid())],  # the parent the worker watches
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=env, start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._send = Connection(to_child_w, readable=False)
        self._recv = Connection(from_child_r, writable=False)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def run(self, job: Job | Duel, timeout_s: float) -> Outcome | DuelOutcome:
        """Evaluate one job (a DuelOutcome for a Duel that ran; an Outcome otherwise, also for a
        Duel that crashed or timed out); its time limit starts when a (re)started worker has said
        it is ready, so a busy CPU's slow process start never costs a candidate its trial."""
        if not self.alive():
            if self._proc is not None:
                self.restarts += 1
                self.kill()
            self._start()
            failed = self._await_ready()
            if failed is not None:
                return failed
        try:
            self._send.send(job)
            if not self._recv.poll(timeout_s):
                self.kill()
                return Outcome("timeout", reason=f"no result within {timeout_s:g} s: killed (a hang costs one trial)")
            data = self._recv.recv()
            outcome = DuelOutcome.from_dict(data) if "sides" in data else Outcome(**data)
            if _is_cuda_fatal(outcome):
                self.kill()  # it exits by itself; make sure the next job goes to a fresh one
            return outcome
        except (EOFError, OSError, ValueError, AttributeError):  # died, or killed by another thread
            return self._died()

    def _await_ready(self) -> Outcome | None:
        """Wait for a fresh worker's READY; an Outcome if it died or never got there."""
        try:
            if not self._recv.poll(STARTUP_TIMEOUT_S):
                tail = self._log_tail()
                self.kill()
                return Outcome("error", reason=f"the worker process did not start within {STARTUP_TIMEOUT_S:g} s{tail}")
            message = self._recv.recv()
        except (EOFError, OSError, ValueError, AttributeError):
            return self._died()
        if message != READY:
            self.kill()
            return Outcome("error", reason=f"the worker process said {message!r} instead of {READY!r}")
        return None

    def _died(self) -> Outcome:
        proc = self._proc
        if proc is None:
            return Outcome("crashed", reason="worker stopped")
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        tail = self._log_tail()
        self.kill()
        return Outcome("crashed", reason=f"worker process died ({_describe_exit(code)}){tail}")

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self._log.read_text(errors="replace").splitlines() if ln.strip()]
        except (OSError, AttributeError):
            return ""
        return f": {lines[-1][:300]}" if lines else ""

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        for conn in (self._send, self._recv):
            if conn is not None:
                conn.close()
        self._proc = self._send = self._recv = None

    def close(self) -> None:
        if self.alive():
            try:
                self._send.send(None)
                self._proc.wait(10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


if __name__ == "__main__":
    # run as the package's module, not as __main__: the Jobs and Duels that arrive as pickles are
    # dsagen.tuning.worker's classes, and _serve tells them apart by class
    from dsagen.tuning import worker as _worker

    _worker._exit_with_parent(int(sys.argv[3]))
    _worker._serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
