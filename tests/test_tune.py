"""The tuner end to end on the CPU: real studies, real worker processes, the Triton interpreter.

Interpreted timings mean nothing, but every path of the machinery is real: legal-space filtering,
grid and TPE studies, the float64 check rejecting a fast wrong kernel, a crashing and a hanging
candidate each costing one trial, Ctrl-C and resume, database writes and the lookup a build makes.
The PostgreSQL test runs two tuning processes on one study through a real server (CI starts one).
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
import dsagen
from dsagen.schedule import load_space
from dsagen.plan import problem_symbols
from dsagen.gpus import get_gpu
from dsagen import db as tuning_db
from dsagen.db.buckets import bucket_of
from dsagen.tuning.study import TuneRequest, tune_kernel

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


# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_tune_without_cuda_says_it_needs_a_gpu(home):
    result = runner.invoke(cli.app, ["tune", str(write_spec(home)), "--S", "8", "--SKV", "300"])
    assert result.exit_code == 1
    assert "needs a CUDA GPU" in result.output and "Traceback" not in result.output


def test_wrong_crashing_and_hanging_candidates_cost_one_trial_each(home, monkeypatch):
    """block_n 256 returns zeros fast, 512 aborts its process, 1024 hangs; 2048 and 4096 are real."""
    monkeypatch.setenv("DSAGEN_TEMPLATE_PATH", str(FAULTY))
    spec = write_spec(home, PIN_BLOCK_N_ONLY)
    db_file = home / "db" / f"{CPU_GPU_TYPE}.json"
    journal = str(home / "studies.journal")
    result = tune_cli(spec, "--kernel", "topk", "--S", "6", "--SKV", "300", "--storage", journal,
                      "--trial-timeout", "25", "--db", db_file)
    assert result.exit_code == 0, result.output
    assert "5/5 trials (grid, 5 legal points" in result.output
    _, trials = counted_trials(journal, "topk")
    status = {json.loads(t.user_attrs["point"])["block_n"]: t.user_attrs["status"] for t in trials}
    assert status == {256: "wrong", 512: "crashed", 1024: "timeout", 2048: "ok", 4096: "ok"}
    errors = {json.loads(t.user_attrs["point"])["block_n"]: t.user_attrs.get("error", "") for t in trials}
    assert "rejected, wrong result" in errors[256]
    assert "SIGABRT" in errors[512]
    assert "no result within 25 s" in errors[1024]
    entry = next(iter(tuning_db.load(db_file).entries.values()))
    assert entry.schedule["block_n"] in (2048, 4096)  # never the fast wrong one
    assert entry.trials == 5 and entry.sampler == "grid" and entry.bucket == bucket_of(6, 300)


def test_tpe_study_never_compiles_an_illegal_point(home):
    """16 heads make block_h 32/64/128 illegal; TPE may propose them, they are pruned uncompiled."""
    spec = dsagen.spec_from_dict({**_small_dict(), "name": "tpe"})
    space = load_space("triton", "sparse_attention")
    problem = problem_symbols(spec, "sparse_attention", get_gpu("nvidia-h200"))
    assert len(space.legal_points(problem)) < len(space.grid())
    r = tune_kernel(TuneRequest(spec, "sparse_attention", 5, 200, device="cpu", gpu_type=CPU_GPU_TYPE,
                                trials=3, storage=str(home / "s.journal"), sampler="tpe",
                                db_path=home / f"{CPU_GPU_TYPE}.json"), progress=False)
    assert r.evaluated == 3 and r.sampler == "tpe" and r.best_ms is not None
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
    spec = write_spec(home, PIN_TWO_FREE)
    journal = str(home / "studies.journal")
    db_file = home / "db" / f"{CPU_GPU_TYPE}.json"
    args = [sys.executable, str(ROOT / "cli.py"), "tune", str(spec), "--kernel", "topk", "--S", "4",
            "--SKV", "200", "--storage", journal, "--device", "cpu", "--trials", "4", "--db", str(db_file)]
    env = child_env
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        time.sleep(1)
        try:
            _, done = counted_trials(journal, "topk")
        except (ValueError, KeyError):
            continue
        if done:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "run the same command again to resume" in err
    _, before = counted_trials(journal, "topk")
    assert 1 <= len(before) < 4
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    _, after = counted_trials(journal, "topk")
    assert len(after) == 4
    assert {t.number for t in before} <= {t.number for t in after}  # nothing measured was lost
    assert f"{4 - len(before)} here" in again.stdout
    assert tuning_db.load(db_file).entries  # the winner was recorded


def test_tuned_entries_drive_the_build_lookup_chain(home, caplog):
    """A build for an H200 reads the user DB: exact bucket, nearest bucket, stale warning, override."""
    spec = dsagen.spec_from_dict(_small_dict())
    point = {"block_n": 2048, "radix_bits": 4, "num_warps": 8, "resident_max": 0, "resident_warps": 32,
             "sample": 128, "candidates": 1024, "row_reads": 2}
    entry = tuning_db.Entry(
        kernel="topk", backend="triton", spec_hash=spec.semantic_hash("topk"), bucket=bucket_of(4096, 32768),
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
        kernel="topk", backend="triton", spec_hash=spec.semantic_hash("topk"), bucket=bucket_of(64, 512),
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
        kernel="topk", backend="triton", spec_hash=spec.semantic_hash("topk"), bucket=bucket_of(64, 512),
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
    a = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    b = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    killed = False
    while time.monotonic() < deadline and not killed:
        time.sleep(1)
        try:
            _, done = counted_trials_by_bucket(url, name_part, bucket_of(S, 200))
        except (ValueError, KeyError):
            continue
        if any(t.user_attrs.get("pid") == b.pid for t in done):
            b.kill()  # abrupt: no chance to clean up
            killed = True
    assert killed, "worker B never finished a trial"
    b.wait()
    out, _ = a.communicate(timeout=600)
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
    spec = dsagen.spec_from_dict(_small_dict())
    r = tune_kernel(TuneRequest(spec, "indexer_topk", 4, 300, device="cpu", gpu_type=CPU_GPU_TYPE, trials=2,
                                storage=str(home / "s.journal"), sampler="tpe",
                                db_path=home / f"{CPU_GPU_TYPE}.json"), progress=False)
    assert r.evaluated == 2 and r.best_ms is not None, r
    _, trials = counted_trials(str(home / "s.journal"), "indexer_topk")
    assert all("top-k contract against float64 logits" in t.user_attrs["check"] for t in trials)
    [entry] = tuning_db.load(home / f"{CPU_GPU_TYPE}.json").entries.values()
    assert entry.kernel == "indexer_topk"
