"""The journal of studies survives a torn record.

A tuning process killed while appending to the journal leaves its last record without its end.
That record is set aside in a side file next to the journal (`<journal>.torn-<time>`), the complete
records stay, and tuning goes on; any other unreadable record is one error naming the file.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

import cli
from test_tune import SMALL  # the small spec every tuner test uses
from dsagen.backends.triton import interpreter_problem
from dsagen.tuning import worker as worker_module
from dsagen.tuning.storage import JournalError, open_storage
from dsagen.tuning.worker import Outcome

ROOT = Path(__file__).resolve().parent.parent
CPU_GPU_TYPE = "cpu-triton-interpreter"
runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "small.toml").write_text(SMALL)
    return tmp_path


class PassingWorker:
    """Stands in for a worker process in the second run: every candidate passes at 1 ms."""

    def run(self, job, timeout_s):
        return Outcome("ok", ms=1.0, check="fake")

    def kill(self):
        pass

    def close(self):
        pass


# `dsagen tune` in a process of its own (its trials' pid is gone when it ends, as after a kill)
# with PassingWorker: what it writes to the journal is real, its candidates are not
PASSING_TUNE = ("import sys, cli, test_tune_journal as here\n"
                "from dsagen.tuning import worker\n"
                "worker.Worker = here.PassingWorker\n"
                "cli.app(sys.argv[1:])\n")


def tune_args(home: Path, trials: int) -> list[str]:
    return ["tune", str(home / "small.toml"), "-k", "topk", "--S", "4", "--SKV", "200", "--device", "cpu", "-q",
            "--trials", str(trials), "--storage", str(home / "studies.journal"),
            "--db", str(home / "db" / f"{CPU_GPU_TYPE}.json")]


def topk_trials(journal: Path) -> dict[int, optuna.trial.FrozenTrial]:
    [summary] = optuna.get_all_study_summaries(open_storage(str(journal)))
    study = optuna.load_study(study_name=summary.study_name, storage=open_storage(str(journal)))
    return {t.number: t for t in study.get_trials()}


def records(data: bytes) -> list[dict]:
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


# the tune runs with --device cpu on the Triton backend: the interpreter must be usable here
@pytest.mark.skipif(interpreter_problem() is not None, reason=str(interpreter_problem()))
def test_a_torn_last_record_is_set_aside_and_tuning_goes_on(home, child_env, monkeypatch, caplog):
    """A study of two trials in a process of its own; 37 bytes cut off its journal's end (as if
    that process died writing); the next tune keeps every complete record, moves the torn one aside
    and adds its trial."""
    journal = home / "studies.journal"
    env = {**child_env, "PYTHONPATH": f"{ROOT / 'tests'}:{child_env['PYTHONPATH']}"}
    first = subprocess.run([sys.executable, "-c", PASSING_TUNE, *tune_args(home, 2)], env=env,
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    before = topk_trials(journal)
    whole = journal.read_bytes()
    cut = whole[:-37]
    journal.write_bytes(cut)
    complete = cut[:cut.rfind(b"\n") + 1]  # the records that were whole before the cut
    torn = cut[len(complete):]
    assert torn and not torn.endswith(b"\n")

    monkeypatch.setattr(worker_module, "Worker", PassingWorker)
    with caplog.at_level(logging.WARNING, logger="dsagen"):
        again = runner.invoke(cli.app, tune_args(home, 3), env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    [side] = home.glob("studies.journal.torn-*")
    assert side.read_bytes() == torn
    assert journal.read_bytes().startswith(complete)
    records(journal.read_bytes())  # every line a whole record again
    [warning] = [r.getMessage() for r in caplog.records if "torn" in r.getMessage()]
    assert str(journal) in warning and str(side) in warning
    after = topk_trials(journal)
    whole_before = [n for n, t in before.items() if t.state.is_finished()]
    for n in whole_before[:-1]:  # the last trial's final record may be the torn one
        assert after[n].state == before[n].state and after[n].value == before[n].value
        assert after[n].user_attrs == before[n].user_attrs
    counted = [t for t in after.values() if t.user_attrs.get("counted") and t.state.is_finished()]
    assert len(counted) == 3 and "3/3 trials" in again.output


def test_a_torn_end_left_by_a_dead_writer_is_set_aside_before_the_next_append(home):
    journal = home / "j.journal"
    study = optuna.create_study(study_name="s", storage=open_storage(str(journal)))
    study.set_user_attr("kept", 1)
    torn = b'{"op_code":6,"worker_id":"gone","trial_id":0,"sta'
    with open(journal, "ab") as f:  # another process died in the middle of this record
        f.write(torn)
    study.set_user_attr("added", 2)
    [side] = home.glob("j.journal.torn-*")
    assert side.read_bytes() == torn
    assert [r.get("user_attr") for r in records(journal.read_bytes()) if r["op_code"] == 2] == [{"kept": 1},
                                                                                              {"added": 2}]
    reread = optuna.load_study(study_name="s", storage=open_storage(str(journal)))
    assert reread.user_attrs == {"kept": 1, "added": 2}


def test_an_unreadable_record_before_the_last_is_one_error_naming_the_file(home):
    """What an older dsagen left after appending onto a torn record: the mixed line cannot be read."""
    journal = home / "studies.journal"
    study = optuna.create_study(study_name="s", storage=open_storage(str(journal)))
    study.set_user_attr("a", 1)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0][:-20] + lines[1] + b'{"op_code":2,"worker_id":"w","study_id":0,"user_attr":{"b":2}}\n')
    with pytest.raises(JournalError, match=rf"^{journal}:1: not a complete journal record"):
        open_storage(str(journal))
    result = runner.invoke(cli.app, tune_args(home, 1), env={"COLUMNS": "200"})
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {journal}:1: not a complete journal record (") and "--storage" in lines[0]
    assert not list(home.glob("studies.journal.torn-*"))  # nothing set aside: the last record is whole
