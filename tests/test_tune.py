"""The tuner end to end on the CPU: real studies, real worker processes, the Triton interpreter.

Interpreted timings mean nothing, but every path of the machinery is real: legal-space filtering,
grid and TPE studies, the float64 check rejecting a fast wrong kernel, a crashing and a hanging
candidate each costing one trial, Ctrl-C and resume, database writes and the lookup a build makes.
The PostgreSQL test runs two tuning processes on one study through a real server (CI starts one).

Nothing here depends on how fast the machine is: a test that must interrupt or kill a tuning process
while a trial is in flight sets the worker's test hook (dsagen.tuning.worker.HOLD_ENV), which makes
a worker hold its n-th trial and create a file; the test acts once that file exists. The one
deliberate hang is killed by a trial time limit far above what the real candidates need on a
loaded 2-core machine (the limit starts once a worker has finished its imports).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

import cli
from dsagen.ops import semantic_hash
import dsagen
from dsagen.ops import get_op
from dsagen.schedule import load_space
from dsagen.plan import problem_symbols
from dsagen.gpus import get_gpu
from dsagen import db as tuning_db
from dsagen.db.buckets import bucket_of
from dsagen.gpus import cpu_model
from dsagen.tuning.study import TuneRequest, tune_kernel
from dsagen.tuning.worker import HOLD_ENV

from dsagen.backends.triton import interpreter_problem

# every test here runs candidates in the Triton interpreter (the H200 machine's numpy 2.4 cannot)
pytestmark = pytest.mark.skipif(interpreter_problem() is not None, reason=str(interpreter_problem()))

ROOT = Path(__file__).resolve().parent.parent
FAULTY = Path(__file__).resolve().parent / "data" / "faulty_templates"
CPU_GPU_TYPE = "cpu-triton-interpreter"
runner = CliRunner()

SMALL = """
name = "small"
[indexer]
heads = 4
head_dim = 32
dtype = "bf16"
[topk]
k = 16
[attention]
heads = 16
qk_dim = 96
v_dim = 64
dtype = "bf16"
"""
# top-k with every knob but block_n pinned: a grid of exactly the five block_n values
PIN_BLOCK_N_ONLY = '\n[schedule.topk]\nradix_bits = 8\nnum_warps = 4\nresident_max = 0\nresident_warps = 32\nsample = 0\ncandidates = 512\nrow_reads = 1\n'
# top-k with block_n and num_warps free: 15 points, enough for two workers to share
PIN_TWO_FREE = '\n[schedule.topk]\nradix_bits = 8\nresident_max = 0\nresident_warps = 32\nsample = 0\ncandidates = 512\nrow_reads = 1\n'


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private cache (modules, journal, user tuning DB) per test."""
    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def write_spec(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "small.toml"
    path.write_text(SMALL + extra)
    return path


def tune_cli(*args, env=None):
    result = runner.invoke(cli.app, ["tune", *map(str, args), "--device", "cpu", "-q"],
                           env={"COLUMNS": "200", "NO_COLOR": "1", **(env or {})})
    return result


def counted_trials(storage: str, name_part: str):
    summaries = optuna.get_all_study_summaries(tuning_storage(storage))
    [summary] = [s for s in summaries if name_part in s.study_name]
    study = optuna.load_study(study_name=summary.study_name, storage=tuning_storage(storage))
    return study, [t for t in study.get_trials() if t.user_attrs.get("counted")]


def tuning_storage(storage: str):
    from dsagen.tuning.storage import open_storage

    return open_storage(storage)


def hold_trial(n: int, flag: Path) -> dict:
    """Environment for a tuning process whose worker holds its n-th trial and then creates `flag`."""
    return {HOLD_ENV: f"{n}:{flag}"}


def wait_until_held(flag: Path, proc: subprocess.Popen, what: str) -> None:
    """Until the worker of `proc` holds a trial; the limit only keeps a broken run from hanging."""
    deadline = time.monotonic() + 900
    while not flag.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"{what} exited ({proc.returncode}) before its worker held a trial:\n{out}\n{err or ''}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what}: no trial held within 900 s")
        time.sleep(0.1)


def spec_text(indexer_heads: int = 4) -> str:
    return SMALL.replace("heads = 4\nhead_dim = 32", f"heads = {indexer_heads}\nhead_dim = 32")


# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_tune_without_cuda_says_it_needs_a_gpu(home):
    result = runner.invoke(cli.app, ["tune", str(write_spec(home)), "--S", "8", "--SKV", "300"])
    assert result.exit_code == 1
    assert "needs a CUDA GPU" in result.output and "Traceback" not in result.output


def test_wrong_crashing_and_hanging_candidates_cost_one_trial_each(home, monkeypatch):
    """block_n 256 returns zeros fast, 512 aborts its process, 1024 hangs; 2048 and 4096 are real.

    The real candidates take about a second each, 5 s on a 2-core machine busy with two other
    CPU-bound processes: far inside the 45 s that kill the hanging one."""
    monkeypatch.setenv("DSAGEN_TEMPLATE_PATH", str(FAULTY))
    spec = write_spec(home, PIN_BLOCK_N_ONLY)
    db_file = home / "db" / f"{CPU_GPU_TYPE}.json"
    journal = str(home / "studies.journal")
    result = tune_cli(spec, "--kernel", "topk", "--S", "6", "--SKV", "300", "--storage", journal,
                      "--trial-timeout", "45", "--db", db_file)
    assert result.exit_code == 0, result.output
    assert "5/5 trials (grid, 5 legal points" in result.output
    _, trials = counted_trials(journal, "topk")
    status = {json.loads(t.user_attrs["point"])["block_n"]: t.user_attrs["status"] for t in trials}
    assert status == {256: "wrong", 512: "crashed", 1024: "timeout", 2048: "ok", 4096: "ok"}
    errors = {json.loads(t.user_attrs["point"])["block_n"]: t.user_attrs.get("error", "") for t in trials}
    assert "rejected, wrong result" in errors[256]
    assert "SIGABRT" in errors[512]
    assert "no result within 45 s" in errors[1024]
    # the schedule builds run (the default block_n 1024) hung in this study: the winner replaces it
    assert "  the current schedule (pinned+default) failed in this study (timeout" in result.output, result.output
    entry = next(iter(tuning_db.load(db_file).entries.values()))
    assert entry.schedule["block_n"] in (2048, 4096)  # never the fast wrong one
    assert entry.device_name == "cpu (Triton interpreter)" and entry.compute_capability == "cpu"
    assert entry.trials == 5 and entry.sampler == "grid" and entry.bucket == bucket_of(6, 300)


def test_tpe_study_never_compiles_an_illegal_point(home):
    """16 heads make block_h 32/64/128 illegal; TPE may propose them, they are pruned uncompiled."""
    spec = dsagen.spec_from_dict({**_small_dict(), "name": "tpe"})
    space = load_space("triton", "sparse_attention")
    problem = problem_symbols(spec, get_op("sparse_attention"), get_gpu("nvidia-h200"))
    assert len(space.legal_points(problem)) < len(space.grid())
    r = tune_kernel(TuneRequest(spec, "sparse_attention", 5, 200, device="cpu", gpu_type=CPU_GPU_TYPE,
                                trials=3, storage=str(home / "s.journal"), sampler="tpe",
                                db_path=home / f"{CPU_GPU_TYPE}.json"), progress=False)
    assert r.evaluated == 3 and r.sampler == "tpe" and r.best_ms is not None
    assert r.variant == "tl" and r.study.startswith("dsagen.sparse_attention.tl.triton.")  # the interpreter's one
    for entry in tuning_db.load(home / f"{CPU_GPU_TYPE}.json").entries.values():  # recorded if it won its duel
        assert entry.schedule["variant"] == "tl" and set(entry.schedule) - {"variant"} == set(space.knobs)
    study, trials = counted_trials(str(home / "s.journal"), "sparse_attention")
    for t in trials:
        assert not space.violations(json.loads(t.user_attrs["point"]), problem)
    for t in study.get_trials():
        if t.state == optuna.trial.TrialState.PRUNED:
            assert t.user_attrs["skipped"] in ("illegal", "already tried")
    modules = list((home / "cache" / "triton").glob("sparse_attention_*.py"))
    assert len(modules) == 3  # one generated module per evaluated point, none for pruned ones


def _small_dict() -> dict:
    import tomllib

    return tomllib.loads(SMALL)


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(home, child_env):
    """Ctrl-C arrives while the second trial is in flight (held by the worker's test hook), however
    fast the machine ran the first; the same command then measures the rest."""
    spec = write_spec(home, PIN_TWO_FREE)
    journal = str(home / "studies.journal")
    db_file = home / "db" / f"{CPU_GPU_TYPE}.json"
    args = [sys.executable, str(ROOT / "cli.py"), "tune", str(spec), "--kernel", "topk", "--S", "4",
            "--SKV", "200", "--storage", journal, "--device", "cpu", "--trials", "4", "--db", str(db_file),
            "--trial-timeout", "3600"]  # the held trial must wait for the signal, not time out
    held = home / "held"
    proc = subprocess.Popen(args, env={**child_env, **hold_trial(2, held)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until_held(held, proc, "the tuning process")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "run the same command again to resume" in err
    study, before = counted_trials(journal, "topk")
    assert len(before) == 1  # the first trial was measured; the held one is not a verdict
    interrupted = [t for t in study.get_trials() if t.user_attrs.get("error") == "interrupted (Ctrl-C)"]
    assert len(interrupted) == 1 and interrupted[0].state == optuna.trial.TrialState.FAIL
    again = subprocess.run(args, env=child_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    _, after = counted_trials(journal, "topk")
    assert len(after) == 4
    assert {t.number for t in before} <= {t.number for t in after}  # nothing measured was lost
    assert "3 here" in again.stdout
    # the study ended: its winner met the schedule builds run (the default, its first trial), and
    # the database holds the winner exactly when the output says it was recorded
    recorded = f"{db_file}: added" in again.stdout
    assert recorded or "nothing recorded: the current schedule (pinned+default) stays" in again.stdout, again.stdout
    assert bool(tuning_db.load(db_file).entries) == recorded


@pytest.mark.skipif(__import__("dsagen.backends.tvm", fromlist=["available"]).available() is not None,
                    reason="needs apache-tvm")
@pytest.mark.parametrize("heads", [3, 1])
def test_tvm_indexer_tunes_on_the_cpu_for_fewer_heads_than_a_cuda_default(home, heads):
    """The CUDA knobs, held while the CPU ones are tuned, move off illegal defaults (cuda_block_h=8
    with 3 heads) to the legal point a build would use; the entry names TVM and this CPU."""
    from dsagen.gpus import cpu_type

    spec = home / "few-heads.toml"
    spec.write_text(spec_text(indexer_heads=heads))
    db_file = home / "db" / f"{cpu_type()}.json"
    result = tune_cli(spec, "--backend", "tvm", "--kernel", "indexer", "--S", "2", "--SKV", "40", "--trials", "1",
                      "--storage", home / "studies.journal", "--db", db_file)
    assert result.exit_code == 0, result.output
    [entry] = tuning_db.load(db_file).entries.values()
    assert entry.kernel == "indexer" and entry.backend == "tvm" and entry.trials == 1
    space = load_space("tvm", "indexer")
    problem = problem_symbols(dsagen.load_spec(spec), get_op("indexer"), get_gpu("nvidia-h200"))
    assert not space.violations(entry.schedule, problem)  # cuda_head_block_within_heads included
    assert entry.device_name == f"cpu (TVM llvm, {cpu_model()})" and entry.compute_capability == "cpu"


def test_a_bad_db_fails_before_any_study_starts(home):
    """--db (or the user's default file) is checked first: one error line, exit 1, no study."""
    spec = write_spec(home, PIN_BLOCK_N_ONLY)
    journal = home / "studies.journal"
    folder = home / "db"
    folder.mkdir()
    corrupt = folder / "corrupt" / f"{CPU_GPU_TYPE}.json"
    corrupt.parent.mkdir()
    corrupt.write_text('{"format": "dsagen-autotune-db",\n "version": 1,\n oops\n')
    other_type = folder / "other" / f"{CPU_GPU_TYPE}.json"  # a valid database of another GPU type, renamed
    other_type.parent.mkdir()
    other_type.write_text('{"format": "dsagen-autotune-db", "version": 1, "gpu_type": "nvidia-h200",\n "entries": [ ]}\n')
    h200 = folder / "nvidia-h200.json"
    h200.write_text('{"format": "dsagen-autotune-db", "version": 1, "gpu_type": "nvidia-h200",\n "entries": [ ]}\n')
    a_file = home / "a-file"
    a_file.write_text("not a folder\n")
    (folder / "dir" / f"{CPU_GPU_TYPE}.json").mkdir(parents=True)
    cases = {
        folder / "winners.json": f"this run tunes on {CPU_GPU_TYPE}, whose tuning database must be a file named "
                                 f"{CPU_GPU_TYPE}.json",
        h200: f"this run tunes on {CPU_GPU_TYPE}",
        corrupt: f"{corrupt}:3: invalid JSON",
        other_type: "'gpu_type' is \"nvidia-h200\" but the file is named",
        a_file / f"{CPU_GPU_TYPE}.json": f"{a_file} is not a folder",
        folder / "dir" / f"{CPU_GPU_TYPE}.json": "is a folder, not a tuning-database file",
    }
    for db, message in cases.items():
        result = tune_cli(spec, "--kernel", "topk", "--kernel", "indexer", "--S", "4", "--SKV", "200",
                          "--storage", journal, "--db", db)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (db, result.output)
        assert message in lines[0], (db, lines[0])
    user_file = tuning_db.db_path(CPU_GPU_TYPE)  # without --db: the user's file, checked the same way
    user_file.parent.mkdir(parents=True)
    user_file.write_text("[]\n")
    result = tune_cli(spec, "--kernel", "topk", "--S", "4", "--SKV", "200", "--storage", journal)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and f"{user_file}:1: the top level must be" in lines[0], lines
    assert not optuna.get_all_study_summaries(tuning_storage(str(journal)))  # no study was started
    assert not list((home / "cache").glob("triton/*.py"))  # nothing was generated


def test_a_winner_that_cannot_be_recorded_does_not_skip_the_studies_after_it(home, monkeypatch):
    """The first study's write fails (a full disk); the second study still runs and records, and
    the command ends with one error line naming the winner that is missing, and exit 1."""
    real_record, calls = tuning_db.record, []

    def full_disk_once(path, entry, **how):
        calls.append(entry.bucket)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real_record(path, entry, **how)

    monkeypatch.setattr(tuning_db, "record", full_disk_once)
    spec = write_spec(home, PIN_BLOCK_N_ONLY)
    db_file = home / "db" / f"{CPU_GPU_TYPE}.json"
    result = tune_cli(spec, "--kernel", "topk", "--S", "4", "--SKV", "200", "--SKV", "600", "--trials", "1",
                      "--storage", home / "studies.journal", "--db", db_file)
    assert result.exit_code == 1, result.output
    assert calls == [bucket_of(4, 200), bucket_of(4, 600)]  # both studies ran to their record
    assert "NOT RECORDED: [Errno 28] No space left on device" in result.output
    assert "tuned 2 studies" in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: 1 of 2 winners not recorded: topk S=4 SKV=200: the winner was not recorded: "
                      "[Errno 28] No space left on device"], result.output
    [entry] = tuning_db.load(db_file).entries.values()
    assert entry.bucket == bucket_of(4, 600)
    r = tune_kernel(TuneRequest(dsagen.load_spec(spec), "topk", 4, 200, device="cpu", gpu_type=CPU_GPU_TYPE,
                                trials=1, storage=str(home / "studies.journal"), db_path=db_file), progress=False)
    assert r.record_error is None and r.db_outcome.endswith("added")  # the API: the study resumed, now recorded


def test_tuned_entries_drive_the_build_lookup_chain(home, caplog):
    """A build for an H200 reads the user DB: exact bucket, nearest bucket, stale warning, override."""
    spec = dsagen.spec_from_dict(_small_dict())
    point = {"block_n": 2048, "radix_bits": 4, "num_warps": 8, "resident_max": 0, "resident_warps": 32,
             "sample": 128, "candidates": 1024, "row_reads": 2}
    entry = tuning_db.Entry(
        kernel="topk", backend="triton", spec_hash=semantic_hash(spec, "topk"), bucket=bucket_of(4096, 32768),
        shape={"S": 4096, "SKV": 32768}, schedule=point, ms=1.0, tflops=None, gbps=500.0, pct_of_roofline=20.0,
        gpu_type="nvidia-h200", device_name="NVIDIA H200", compute_capability="9.0", date="2026-11-28",
        versions={**tuning_db.running_versions(), "torch": "0.0-old"}, trials=10, sampler="tpe", study="s")
    assert tuning_db.record(tuning_db.db_path("nvidia-h200"), entry) == "added"
    kernels = dsagen.build(spec, gpu="nvidia-h200")
    exact = kernels.explain(4096, 32768)["topk"]
    assert exact["schedule"] == point and exact["source"].startswith("tuned (exact bucket S4096-SKV32768)")
    assert exact["stale"] and "torch" in exact["stale"][0]
    near = kernels.explain(2000, 30000)["topk"]
    assert near["schedule"] == point and near["source"].startswith("tuned (nearest bucket S4096-SKV32768")
    assert kernels.explain(2000, 30000)["indexer"]["source"].startswith("default")  # nothing tuned for it
    pinned = {"block_n": 512, "radix_bits": 8, "num_warps": 4, "resident_max": 0, "resident_warps": 32}
    assert dsagen.build(spec, gpu="nvidia-h200", schedules={"topk": pinned}).explain(4096, 32768)["topk"]["source"] == "override"
    assert dsagen.build(spec, gpu="nvidia-h200", use_db=False).explain(4096, 32768)["topk"]["source"] == "default"
    pins_other = dsagen.spec_from_dict({**_small_dict(), "schedule": {"topk": {"block_n": 512}}})
    assert dsagen.build(pins_other, gpu="nvidia-h200").explain(4096, 32768)["topk"]["source"] == "pinned+default"
    out = runner.invoke(cli.app, ["explain", str(write_spec(home)), "--gpu", "nvidia-h200"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "tuned (exact bucket S4096-SKV32768)" in out.output and "stale" in out.output


def test_a_tuned_schedule_that_no_longer_fits_is_ignored(home):
    spec = dsagen.spec_from_dict(_small_dict())
    entry = tuning_db.Entry(
        kernel="topk", backend="triton", spec_hash=semantic_hash(spec, "topk"), bucket=bucket_of(64, 512),
        shape={"S": 64, "SKV": 512}, schedule={"block_n": 999, "radix_bits": 8}, ms=1.0, tflops=None, gbps=None,
        pct_of_roofline=None, gpu_type="nvidia-h200", device_name="NVIDIA H200", compute_capability="9.0",
        date="2026-11-28", versions=tuning_db.running_versions(), trials=1, sampler="grid", study="s")
    tuning_db.record(tuning_db.db_path("nvidia-h200"), entry)
    assert dsagen.build(spec, gpu="nvidia-h200").explain(64, 512)["topk"]["source"] == "default"


def test_a_tuned_schedule_from_before_a_new_knob_is_ignored(home):
    """An entry recorded before the search space grew a knob names only the old knobs: it is
    skipped with a warning (its legality cannot be judged), never an error."""
    spec = dsagen.spec_from_dict(_small_dict())
    old_knobs = {"block_n": 512, "radix_bits": 8, "num_warps": 4, "resident_max": 0, "resident_warps": 32}
    entry = tuning_db.Entry(
        kernel="topk", backend="triton", spec_hash=semantic_hash(spec, "topk"), bucket=bucket_of(64, 512),
        shape={"S": 64, "SKV": 512}, schedule=old_knobs, ms=1.0, tflops=None, gbps=None,
        pct_of_roofline=None, gpu_type="nvidia-h200", device_name="NVIDIA H200", compute_capability="9.0",
        date="2026-11-28", versions=tuning_db.running_versions(), trials=1, sampler="grid", study="s")
    tuning_db.record(tuning_db.db_path("nvidia-h200"), entry)
    assert dsagen.build(spec, gpu="nvidia-h200").explain(64, 512)["topk"]["source"] == "default"
    # a current entry of another bucket is the nearest usable one: it answers instead
    current = {**dsagen.build(spec, gpu="nvidia-h200", use_db=False).explain(64, 512)["topk"]["schedule"],
               "block_n": 1024}
    tuning_db.record(tuning_db.db_path("nvidia-h200"), dataclasses.replace(
        entry, bucket=bucket_of(4096, 32768), shape={"S": 4096, "SKV": 32768}, schedule=current))
    hit = dsagen.build(spec, gpu="nvidia-h200").explain(64, 512)["topk"]
    assert hit["source"].startswith("tuned (nearest bucket") and hit["schedule"] == current
    # `dsagen db prune` removes the old entry from the file and keeps the current one
    path = tuning_db.db_path("nvidia-h200")
    before = path.read_text()
    out = runner.invoke(cli.app, ["db", "prune", str(path), "--dry-run"])
    assert out.exit_code == 0 and "1 entries would be dropped" in out.output and path.read_text() == before
    out = runner.invoke(cli.app, ["db", "prune", str(path)])
    assert out.exit_code == 0 and "1 entries dropped" in out.output
    assert [e.schedule for e in tuning_db.load(path).entries.values()] == [current]
    out = runner.invoke(cli.app, ["db", "prune", str(path.parent / "missing" / "nvidia-h200.json")])
    assert out.exit_code == 1 and "no such database file" in out.output and not (path.parent / "missing").exists()


# ------------------------------------------------------------------------------------------------
# PostgreSQL: CI starts a server and sets DSAGEN_TEST_POSTGRES_URL (and DSAGEN_REQUIRE_POSTGRES=1,
# so that a missing server fails there instead of skipping)

def _postgres_url() -> str:
    url = os.environ.get("DSAGEN_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("DSAGEN_REQUIRE_POSTGRES") == "1":
            pytest.fail("DSAGEN_REQUIRE_POSTGRES=1 but DSAGEN_TEST_POSTGRES_URL is not set")
        pytest.skip("no PostgreSQL server: set DSAGEN_TEST_POSTGRES_URL (CI does)")
    return url


def test_two_workers_share_one_study_through_postgresql_and_survive_a_kill(home, child_env):
    url = _postgres_url()
    spec = write_spec(home, PIN_TWO_FREE)
    S = 4
    name_part = f"topk.triton.{CPU_GPU_TYPE}."
    for old in optuna.get_all_study_summaries(tuning_storage(url)):  # a reused server: start afresh
        if name_part in old.study_name:
            optuna.delete_study(study_name=old.study_name, storage=tuning_storage(url))
    args = [sys.executable, str(ROOT / "cli.py"), "tune", str(spec), "--kernel", "topk", "--S", str(S),
            "--SKV", "200", "--storage", url, "--device", "cpu", "--sampler", "grid", "-q",
            "--db", str(home / "db" / f"{CPU_GPU_TYPE}.json")]
    env = child_env
    # B measures one point and holds its second (test hook); A joins; B is killed with that trial in
    # flight once A has measured a point of its own. A cannot finish before: B's held point is running.
    held = home / "held-b"
    b = subprocess.Popen(args, env={**env, **hold_trial(2, held)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    a = None
    try:
        wait_until_held(held, b, "tuning process B")
        a = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 900  # only keeps a broken run from hanging
        while True:
            _, done = counted_trials_by_bucket(url, name_part, bucket_of(S, 200))
            if any(t.user_attrs.get("pid") == a.pid for t in done):
                break
            assert a.poll() is None, a.communicate()[0]
            assert time.monotonic() < deadline, "tuning process A measured nothing in 900 s"
            time.sleep(0.2)
        b.kill()  # abrupt: no chance to clean up
        b.wait()
        out, _ = a.communicate(timeout=600)
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert a.returncode == 0, out
    study, done = counted_trials_by_bucket(url, name_part, bucket_of(S, 200))
    points = [t.user_attrs["point"] for t in done]
    assert len(set(points)) == 15 and all(t.user_attrs["status"] == "ok" for t in done)  # the whole grid
    assert {t.user_attrs["pid"] for t in done} == {a.pid, b.pid}  # both contributed
    running = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]
    assert not running  # B's interrupted trial was failed and its point re-run


def counted_trials_by_bucket(storage: str, name_part: str, bucket: str):
    summaries = optuna.get_all_study_summaries(tuning_storage(storage))
    names = [s.study_name for s in summaries if name_part in s.study_name and f".{bucket}." in s.study_name]
    if not names:
        raise KeyError(name_part)
    study = optuna.load_study(study_name=names[-1], storage=tuning_storage(storage))
    return study, [t for t in study.get_trials() if t.user_attrs.get("counted")]


def test_the_fused_indexer_topk_tunes_like_the_others(home):
    """One trial: the study's first point is the schedule builds run (the default), so its winner is
    that schedule, and recorded (nothing tuned supplied it) without a duel."""
    spec = dsagen.spec_from_dict(_small_dict())
    r = tune_kernel(TuneRequest(spec, "indexer_topk", 4, 300, device="cpu", gpu_type=CPU_GPU_TYPE, trials=1,
                                storage=str(home / "s.journal"), sampler="tpe",
                                db_path=home / f"{CPU_GPU_TYPE}.json"), progress=False)
    assert r.evaluated == 1 and r.best_ms is not None, r
    assert r.comparison.startswith("the winner is the current schedule (default")
    _, trials = counted_trials(str(home / "s.journal"), "indexer_topk")
    assert all("top-k contract against float64 logits" in t.user_attrs["check"] for t in trials)
    [entry] = tuning_db.load(home / f"{CPU_GPU_TYPE}.json").entries.values()
    assert entry.kernel == "indexer_topk"


def test_a_decode_kernel_records_its_winner_under_the_call_shape(home):
    """A decode workload of S requests calls with S * next_n rows: the winner is stored (and found)
    under that call's bucket."""
    spec = dsagen.Spec(topk=dsagen.TopKSpec(k=16), cache=dsagen.CacheSpec(page_size=16))
    db_file = home / f"{CPU_GPU_TYPE}.json"
    r = tune_kernel(TuneRequest(spec, "decode_topk", 3, 300, device="cpu", gpu_type=CPU_GPU_TYPE, trials=1,
                                storage=str(home / "s.journal"), sampler="tpe", db_path=db_file), progress=False)
    assert r.evaluated == 1 and r.best_ms is not None, r
    [entry] = tuning_db.load(db_file).entries.values()
    assert entry.kernel == "decode_topk" and entry.bucket == "S8-SKV512" and entry.shape == {"S": 6, "SKV": 300}
    assert entry.semantics == get_op("decode_topk").semantic_fields(spec)  # lets other specs find it as a neighbour
