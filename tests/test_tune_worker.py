"""Worker processes: they never outlive the `dsagen tune` that started them, and they time on the
CPU one at a time.

In the first test the worker holds a candidate (the test hook dsagen.tuning.worker.HOLD_ENV: it computes for ever, as
far as anyone can tell, and never reads its pipe) when its parent is killed with SIGKILL, which
leaves the parent no chance to clean up; the worker must notice and exit on its own.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsagen.backends.triton import interpreter_problem
from dsagen.tuning.worker import HOLD_ENV
from test_tune import SMALL  # the small spec every tuner test uses

ROOT = Path(__file__).resolve().parent.parent


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, dead but not yet reaped by its new parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def held_worker_pid(flag: Path, proc: subprocess.Popen) -> int:
    """The pid the worker writes once it holds its trial; the limit only keeps a broken run from hanging."""
    deadline = time.monotonic() + 900
    while not flag.exists() or not flag.read_text().endswith("\n"):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the tuning process exited ({proc.returncode}) before its worker held a trial:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no trial held within 900 s")
        time.sleep(0.1)
    return int(flag.read_text())


@pytest.mark.skipif(interpreter_problem() is not None, reason=str(interpreter_problem()))
def test_a_worker_exits_when_its_tune_process_is_killed(tmp_path, child_env):
    spec = tmp_path / "small.toml"
    spec.write_text(SMALL)
    flag = tmp_path / "held"
    env = {**child_env, "DSAGEN_CACHE_DIR": str(tmp_path / "cache"), HOLD_ENV: f"1:{flag}"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "tune", str(spec), "-k", "topk", "--S", "4",
                             "--SKV", "200", "--device", "cpu", "--trials", "1", "--trial-timeout", "3600",
                             "--storage", str(tmp_path / "studies.journal"),
                             "--db", str(tmp_path / "db" / "cpu-triton-interpreter.json")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = held_worker_pid(flag, proc)
        assert worker != proc.pid and running(worker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        deadline = time.monotonic() + 30  # generous: the worker looks for its parent every 0.2 s
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(worker), f"worker {worker} still runs after its parent was killed"
    finally:
        if proc.poll() is None:
            proc.kill()
        if worker is not None and running(worker):
            os.kill(worker, signal.SIGKILL)


def test_cpu_candidates_and_duels_are_timed_under_the_hosts_cpu_lock(tmp_path, monkeypatch):
    """--jobs N compiles N candidates at once on the CPU, but times one at a time: every timed call
    runs while the CPU timing lock (one file for the host's cache folder) is held."""
    import fcntl

    from dsagen.tuning import worker as worker_module
    from dsagen.tuning.worker import Duel, Job, Outcome

    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(tmp_path / "cache"))
    lock_file = tmp_path / "cache" / "tuning" / "timing-cpu.lock"
    held: list[bool] = []

    def timed_call():
        with open(lock_file, "a+") as other:  # another open file: blocked while anyone holds the lock
            try:
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(True)
            else:
                held.append(False)
                fcntl.flock(other.fileno(), fcntl.LOCK_UN)

    monkeypatch.setattr(worker_module, "_checked_call", lambda job, point: (Outcome("ok", check="fake"), timed_call))
    job = Job({}, "topk", {"block_n": 1}, 4, 200, "cpu", seed=0, plan_gpu="nvidia-h200", backend="tvm")
    assert worker_module.evaluate(job).ok and held and all(held)
    held.clear()
    duel = Duel({}, "topk", ({"block_n": 1}, {"block_n": 2}), 4, 200, "cpu", seed=0, plan_gpu="nvidia-h200", rounds=3)
    assert worker_module.duel(duel).ok and len(held) >= 2 * 3 and all(held)
