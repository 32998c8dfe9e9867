"""The end of a study: its winner is recorded only if it beats the schedule builds run today.

The decision is tested with a stand-in worker whose times are fixed numbers (nothing compiled,
nothing timed), so these tests cannot depend on how fast or how loaded the machine is; one real
duel in a worker process and one real `dsagen tune` check what the measurements look like.
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from test_tune import SMALL  # the small spec every tuner test uses
from dsagen.ops import get_op, semantic_hash
import dsagen
from dsagen import db as tuning_db
from dsagen.backends import tvm as tvm_backend
from dsagen.db.buckets import bucket_of
from dsagen.gpus import cpu_type, get_gpu
from dsagen.plan import problem_symbols
from dsagen.resolve import Resolver
from dsagen.schedule import load_space
from dsagen.tuning import worker as worker_module
from dsagen.tuning.study import fixed_knobs, trial_count
from dsagen.tuning.worker import Duel, DuelOutcome, Job, Outcome

ROOT = Path(__file__).resolve().parent.parent
FAULTY = Path(__file__).resolve().parent / "data" / "faulty_templates"
runner = CliRunner()

S, SKV = 4, 300
KERNEL = "sparse_attention"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private cache (modules, journal, the user's tuning database) per test."""
    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


class FakeWorker:
    """Stands in for a worker process: every candidate passes; the search's time of a point and
    the duel's times (current, winner) come from the test: the same in every round, or per round."""

    search_ms: dict[str, float] = {}
    default_ms = 5.0
    duel: tuple[float, float] | list[tuple[float, float]] | Outcome = (1.0, 1.0)
    duels: list[tuple[dict, dict]] = []

    def run(self, job, timeout_s):
        if isinstance(job, Duel):
            FakeWorker.duels.append(job.points)
            if isinstance(self.duel, Outcome):
                return self.duel
            rounds = self.duel if isinstance(self.duel, list) else [self.duel] * job.rounds
            sides = [Outcome("ok", ms=statistics.median(r[i] for r in rounds), check="fake") for i in (0, 1)]
            return DuelOutcome(sides, [list(r) for r in rounds])
        assert isinstance(job, Job)
        return Outcome("ok", ms=self.search_ms.get(key(job.point), self.default_ms), check="fake")

    def kill(self):
        pass

    def close(self):
        pass


TVM_PROBLEM = tvm_backend.available()
needs_tvm = pytest.mark.skipif(TVM_PROBLEM is not None, reason=f"needs apache-tvm: {TVM_PROBLEM}")


@pytest.fixture
def fake(monkeypatch):
    """`dsagen tune` with FakeWorker processes; the test sets its times. The command still checks
    that the TVM backend it tunes for is installed."""
    if TVM_PROBLEM is not None:
        pytest.skip(f"dsagen tune --backend tvm needs apache-tvm: {TVM_PROBLEM}")
    monkeypatch.setattr(worker_module, "Worker", FakeWorker)
    FakeWorker.search_ms, FakeWorker.duel, FakeWorker.duels = {}, (1.0, 1.0), []
    return FakeWorker


def key(point: dict) -> str:
    return ",".join(f"{k}={int(v)}" for k, v in sorted(point.items()))


def write_spec(home: Path) -> Path:
    (path := home / "small.toml").write_text(SMALL)
    return path


def spec() -> dsagen.Spec:
    import tomllib

    return dsagen.spec_from_dict(tomllib.loads(SMALL))


def legal_cpu_points() -> list[dict]:
    """The points a CPU study of KERNEL searches (the CUDA knobs held where the study holds them)."""
    space = load_space("tvm", KERNEL)
    untuned = Resolver(spec(), "tvm", "nvidia-h200", use_db=False).resolve(KERNEL, device_type="cpu").point
    fixed = fixed_knobs(space, "cpu", untuned)
    return [p for p in space.legal_points(problem_symbols(spec(), get_op(KERNEL), get_gpu("nvidia-h200")))
            if all(p[k] == v for k, v in fixed.items())]


def record_current(point: dict, ms: float = 2.0) -> Path:
    """A user-database entry for KERNEL at this bucket: the schedule builds run today."""
    call = bucket_of(S, SKV)
    entry = tuning_db.Entry(
        kernel=KERNEL, backend="tvm", spec_hash=semantic_hash(spec(), KERNEL), bucket=call, shape={"S": S, "SKV": SKV},
        schedule=point, ms=ms, tflops=None, gbps=None, pct_of_roofline=None, gpu_type=cpu_type(),
        device_name="cpu (TVM llvm, test)", compute_capability="cpu", date="2026-12-01",
        versions=tuning_db.running_versions(), trials=3, sampler="tpe", study="earlier")
    path = tuning_db.db_path(cpu_type())
    assert tuning_db.record(path, entry) == "added"
    return path


def built_point() -> dict:
    return dsagen.build(spec(), backend="tvm").resolve(KERNEL, S, SKV, "cpu").point


def tune(home: Path, *args):
    return runner.invoke(cli.app, ["tune", str(write_spec(home)), "--backend", "tvm", "--device", "cpu", "-k", KERNEL,
                                   "--S", str(S), "--SKV", str(SKV), "--sampler", "tpe", "--storage",
                                   str(home / "studies.journal"), *map(str, args)],
                         env={"COLUMNS": "200", "NO_COLOR": "1"})


def result_line(output: str) -> str:
    [line] = [ln for ln in output.splitlines() if ln.startswith(f"{KERNEL} S={S} SKV={SKV}: ")]
    return line


def comparison_line(output: str) -> str:
    lines = output.splitlines()
    return lines[lines.index(result_line(output)) + 1]


# ------------------------------------------------------------------------------------------------
# the decision, with fixed times

@pytest.mark.parametrize("duel", [(673.0, 1059.0), (700.0, 700.0)], ids=["slower", "as-fast"])
def test_a_winner_not_faster_than_the_current_schedule_is_not_recorded(home, fake, duel):
    """The search timed the current schedule first and slowest (a machine warming up); in the
    duel it is faster (or no slower): the database and what builds run stay exactly as they were."""
    current, other = legal_cpu_points()[:2]
    path = record_current(current)
    before = path.read_text()
    fake.search_ms = {key(current): 1000.0}
    fake.default_ms, fake.duel = 900.0, duel
    result = tune(home, "--trials", "3")
    assert result.exit_code == 0, result.output
    [(now, winner)] = fake.duels
    assert now == current and winner != current  # the current schedule against the search's winner
    assert path.read_text() == before and built_point() == current
    assert result_line(result.output).endswith(f"nothing recorded: the current schedule (tuned (exact bucket "
                                               f"{bucket_of(S, SKV)}), {path}) stays")
    assert comparison_line(result.output) == (
        f"  current schedule {duel[0]:.4f} ms, winner {duel[1]:.4f} ms (timed in turns in one process, median of "
        f"5 rounds; the winner faster in 0 of 5): the current schedule stays")


def test_a_lower_median_from_a_few_rounds_is_not_enough(home, fake):
    """The winner's median is lower, but it was faster in only 3 of the 5 rounds: a coin toss
    between equal schedules on a busy machine, so the current schedule stays."""
    current = legal_cpu_points()[0]
    path = record_current(current)
    before = path.read_text()
    fake.search_ms = {key(current): 1000.0}
    fake.default_ms = 900.0
    fake.duel = [(100.0, 90.0), (100.0, 95.0), (100.0, 99.0), (90.0, 120.0), (95.0, 130.0)]
    result = tune(home, "--trials", "2")
    assert result.exit_code == 0, result.output
    assert path.read_text() == before
    assert comparison_line(result.output) == (
        "  current schedule 100.0000 ms, winner 99.0000 ms (timed in turns in one process, median of 5 rounds; "
        "the winner faster in 3 of 5): the current schedule stays")


def test_a_winner_faster_than_the_current_schedule_is_recorded(home, fake):
    current = legal_cpu_points()[0]
    path = record_current(current)
    fake.search_ms = {key(current): 1000.0}
    fake.default_ms, fake.duel = 900.0, (700.0, 600.0)
    result = tune(home, "--trials", "3")
    assert result.exit_code == 0, result.output
    [(now, winner)] = fake.duels
    [entry] = tuning_db.load(path).entries.values()
    assert entry.schedule == winner != current and entry.ms == 600.0  # the duel's time, not the search's
    assert built_point() == winner
    assert result_line(result.output).endswith(f"{path}: replaced")
    assert comparison_line(result.output) == (
        "  current schedule 700.0000 ms, winner 600.0000 ms (timed in turns in one process, median of 5 rounds; "
        "the winner faster in 5 of 5): the winner is recorded")


def test_when_the_winner_is_what_builds_run_nothing_changes(home, fake):
    """One trial: the study's first point is the database's schedule, so it wins without a duel."""
    current = legal_cpu_points()[1]
    path = record_current(current)
    before = path.read_text()
    result = tune(home, "--trials", "1")
    assert result.exit_code == 0, result.output
    assert fake.duels == [] and path.read_text() == before
    assert result_line(result.output).endswith("nothing recorded: the winner is the schedule builds already run")
    assert comparison_line(result.output).startswith("  the winner is the current schedule (tuned (exact bucket")


def test_an_untuned_winner_that_builds_run_already_is_recorded(home, fake):
    """No entry supplies the current schedule (the defaults): a study that confirms it records it,
    so that the next study of this kernel starts from a tuned entry (builds run the same point)."""
    result = tune(home, "--trials", "1")
    assert result.exit_code == 0, result.output
    [entry] = tuning_db.load(tuning_db.db_path(cpu_type())).entries.values()
    assert fake.duels == [] and entry.schedule == built_point()
    assert comparison_line(result.output).startswith("  the winner is the current schedule (default")


def test_a_duel_that_does_not_finish_records_nothing(home, fake):
    current = legal_cpu_points()[0]
    path = record_current(current)
    before = path.read_text()
    fake.search_ms = {key(current): 1000.0}
    fake.default_ms, fake.duel = 900.0, Outcome("timeout", reason="no result within 540 s: killed")
    result = tune(home, "--trials", "2")
    assert result.exit_code == 0, result.output
    assert len(fake.duels) == 1 and path.read_text() == before
    assert result_line(result.output).endswith(
        "nothing recorded: the duel with the current schedule did not finish (timeout: no result within 540 s: "
        "killed)")


def test_progress_names_the_shape_asked_for_and_never_counts_past_the_budget(home, fake):
    """A decode workload of S=2 requests calls with 4 rows (its bucket S4), but the user asked
    for S=2; a second run asking for fewer trials than the study holds says so."""
    args = ["tune", str(ROOT / "specs" / "deepseek_v32_serving.toml"), "--device", "cpu", "-k", "decode_topk",
            "--S", "2", "--SKV", "300", "--storage", str(home / "studies.journal"), "--db", str(home / "cpu-triton-interpreter.json")]
    first = runner.invoke(cli.app, [*args, "--trials", "3"], env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    assert "[decode_topk S2-SKV300 " in first.stderr and "S4-SKV" not in first.stderr
    assert "3/3 trials (" in first.stdout
    again = runner.invoke(cli.app, [*args, "--trials", "2"], env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    assert "3 trials, more than the 2 asked (the study already held them) (" in again.stdout
    assert "3/2" not in again.output
    assert trial_count(2, 3) == "2/3 trials"


def test_devices_with_the_cpu_is_one_error_line(home):
    result = runner.invoke(cli.app, ["tune", str(write_spec(home)), "--device", "cpu", "--devices", "0,1",
                                     "--S", "4", "--SKV", "300", "-k", "topk"], env={"COLUMNS": "200"})
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: --devices ") and "--device cpu" in lines[0]


# ------------------------------------------------------------------------------------------------
# real measurements: what a duel and a tune print (their numbers are whatever the machine gives)



@needs_tvm
def test_a_real_duel_times_both_sides_in_turns(home):
    """Two TVM CPU schedules in a worker process: both checked, each timed once per round."""
    a, b = legal_cpu_points()[:2]
    w = worker_module.Worker()
    try:
        out = w.run(Duel(spec().to_dict(), KERNEL, (a, b), S, SKV, "cpu", seed=3, plan_gpu="nvidia-h200",
                         backend="tvm", rounds=3), 600)
    finally:
        w.close()
    assert isinstance(out, DuelOutcome) and out.ok, out
    assert len(out.rounds) == 3 and all(len(r) == 2 and min(r) > 0 for r in out.rounds)
    for i, side in enumerate(out.sides):
        assert side.ms == statistics.median(r[i] for r in out.rounds)
        assert side.check.startswith("float64 reference")


def test_a_duel_side_that_fails_its_check_is_not_timed(home, monkeypatch):
    """The faulty top-k template returns zeros at block_n 256: that side is rejected, nothing is timed."""
    from dsagen.backends.triton import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())
    monkeypatch.setenv("DSAGEN_TEMPLATE_PATH", str(FAULTY))
    point = Resolver(spec(), "triton", "nvidia-h200", use_db=False).resolve("topk", device_type="cpu").point
    good, wrong = {**point, "block_n": 2048}, {**point, "block_n": 256}
    out = worker_module.duel(Duel(spec().to_dict(), "topk", (good, wrong), 4, 200, "cpu", seed=1,
                                  plan_gpu="nvidia-h200", rounds=3))
    assert [s.status for s in out.sides] == ["ok", "wrong"] and out.rounds == []
    assert out.sides[0].ms is None and "rejected, wrong result" in out.sides[1].reason


@needs_tvm
def test_a_real_tune_prints_the_current_schedule_beside_the_winner(home):
    """The structure of a real run's output, whichever side the machine's timings favour."""
    result = tune(home, "--trials", "2", "-q")
    assert result.exit_code == 0, result.output
    line, comparison = result_line(result.output), comparison_line(result.output)
    number = r"\d+\.\d{4}"
    duel = re.fullmatch(rf"  current schedule ({number}) ms, winner ({number}) ms \(timed in turns in one process, "
                        rf"median of 5 rounds; the winner faster in [0-5] of 5\): "
                        rf"(the winner is recorded|the current schedule stays)", comparison)
    same = re.fullmatch(rf"  the winner is the current schedule \(default.*\): ({number}) ms", comparison)
    assert duel or same, comparison
    entries = list(tuning_db.load(tuning_db.db_path(cpu_type())).entries.values())
    if duel and duel.group(3) == "the current schedule stays":
        assert not entries
        assert line.endswith("nothing recorded: the current schedule (default (nearest legal)) stays")
    else:
        [entry] = entries
        assert line.endswith(": added") and f"{entry.ms:.4f}" == (duel or same).group(2 if duel else 1)


# ------------------------------------------------------------------------------------------------
# where the current schedule came from, and how it failed, decide whether a duel is needed

class _Current:
    def __init__(self, point: dict, source: str):
        self.point, self.source = point, source


class _DuelWorker:
    """A worker that answers only duels: current and winner at fixed times in every round."""

    def __init__(self, current_ms: float = 2.0, winner_ms: float = 1.0):
        self.duels, self.times = 0, (current_ms, winner_ms)

    def run(self, job, timeout_s):
        assert isinstance(job, Duel)
        self.duels += 1
        sides = [Outcome("ok", ms=ms, check="fake") for ms in self.times]
        return DuelOutcome(sides, [list(self.times)] * job.rounds)


def _study_with(point: dict, status: str, error: str = ""):
    """An in-memory study whose one counted trial ran `point` and ended with `status`."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from dsagen.tuning.study import _point_key

    study = optuna.create_study()
    study.add_trial(create_trial(state=TrialState.COMPLETE if status == "ok" else TrialState.FAIL,
                                 value=1.0 if status == "ok" else None,
                                 params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)},
                                 user_attrs={"counted": True, "point": _point_key(point), "status": status,
                                             "error": error}))
    return study


def _request():
    from dsagen.tuning.study import TuneRequest

    return TuneRequest(spec(), KERNEL, S, SKV, device="cpu", backend="tvm", gpu_type="nvidia-h100")


def test_a_schedule_borrowed_from_a_sibling_gpu_and_confirmed_here_is_recorded():
    """Builds on an H100 run the H200's entry; a study on the H100 that finds that same schedule
    best has measured it here, so it goes to the H100's database (a build there no longer borrows)."""
    from dsagen.tuning.study import _judge

    point = legal_cpu_points()[0]
    worker = _DuelWorker()
    borrowed = _Current(point, "tuned on nvidia-h200 (same compute capability 9.0, bucket S4-SKV256)")
    verdict = _judge(_request(), _study_with(point, "ok"), worker, "nvidia-h100", borrowed, point, 1.5, {}, False,
                     progress=False)
    assert verdict.record and verdict.ms == 1.5 and worker.duels == 0
    own = _Current(point, "tuned (exact bucket S4-SKV256)")
    verdict = _judge(_request(), _study_with(point, "ok"), worker, "nvidia-h100", own, point, 1.5, {}, False,
                     progress=False)
    assert not verdict.record and verdict.outcome == "nothing recorded: the winner is the schedule builds already run"


@pytest.mark.parametrize("status", ["error"])
def test_a_current_schedule_that_crashed_in_the_study_still_meets_the_winner_in_a_duel(status):
    """An error (out of memory beside other workers) may be the machine's doing: the winner is
    recorded only after the duel (here the winner is faster in every round)."""
    from dsagen.tuning.study import _judge

    current, winner = legal_cpu_points()[:2]
    worker = _DuelWorker()
    verdict = _judge(_request(), _study_with(current, status, "CUDA error: out of memory"), worker, "nvidia-h100",
                     _Current(current, "tuned (exact bucket S4-SKV256)"), winner, 1.0, {}, False, progress=False)
    assert worker.duels == 1 and verdict.record and verdict.current_ms == 2.0


@pytest.mark.parametrize("status", ["wrong", "crashed", "timeout"])
def test_a_current_schedule_that_failed_its_check_in_the_study_is_replaced_without_a_duel(status):
    """A wrong result, a crash or a hang would cost the duel as much again: the winner replaces it."""
    from dsagen.tuning.study import _judge

    current, winner = legal_cpu_points()[:2]
    worker = _DuelWorker()
    verdict = _judge(_request(), _study_with(current, status, "max error 3.1"), worker, "nvidia-h100",
                     _Current(current, "tuned (exact bucket S4-SKV256)"), winner, 1.0, {}, False, progress=False)
    assert worker.duels == 0 and verdict.record
    assert f"failed in this study ({status}: max error 3.1)" in verdict.comparison


def test_a_borrowed_schedule_that_wins_its_duel_is_recorded_for_this_gpu_at_its_time_here():
    from dsagen.tuning.study import _judge

    current, winner = legal_cpu_points()[:2]
    worker = _DuelWorker(current_ms=1.0, winner_ms=3.0)
    borrowed = _Current(current, "tuned on nvidia-h200 (same compute capability 9.0, bucket S4-SKV256)")
    verdict = _judge(_request(), _study_with(current, "ok"), worker, "nvidia-h100", borrowed, winner, 0.9, {}, False,
                     progress=False)
    assert worker.duels == 1 and verdict.record and verdict.point == current and verdict.ms == 1.0
    own = _Current(current, "tuned (exact bucket S4-SKV256)")
    verdict = _judge(_request(), _study_with(current, "ok"), worker, "nvidia-h100", own, winner, 0.9, {}, False,
                     progress=False)
    assert not verdict.record and verdict.point is None
