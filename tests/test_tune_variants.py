"""Tuning a kernel of several variants (sparse_attention: tl, gluon, gluon_split): one study per
variant, whose candidates, seeds, duel and recorded schedule all name that variant, while the
schedule builds run today is duelled as the variant it is.

The studies run on "cuda" with a stand-in worker whose times are fixed numbers (nothing compiled
or timed, no GPU needed), as in test_tune_duel.py; the variant choice itself is plain data.
"""
from __future__ import annotations

import statistics

import pytest
from typer.testing import CliRunner

import cli
import dsagen
from dsagen import db
from dsagen.db.buckets import bucket_of
from dsagen.ops import get_op, semantic_hash
from dsagen.tuning import study as study_module
from dsagen.tuning.study import TuneRequest, tunable_variants, tune_kernel
from dsagen.tuning.worker import Duel, DuelOutcome, Job, Outcome

V32 = dsagen.load_spec("specs/deepseek_v32.toml")
KERNEL = "sparse_attention"
OP = get_op(KERNEL)
S, SKV = 4096, 32768
GPU = "nvidia-h200"


@pytest.fixture(autouse=True)
def _private_user_dir(tmp_path, monkeypatch):
    """Only this test's entries (no shipped database); an entry says it was tuned on an H200."""
    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("dsagen.db.store.shipped_db_dir", lambda: tmp_path / "no-shipped-db")
    monkeypatch.setattr(study_module, "_device_facts", lambda device, backend: ("NVIDIA H200", "9.0"))


class FakeWorker:
    """Every candidate passes at `search_ms`; a duel answers (current, winner) = `duel_ms` in
    every round. Records every Job's and Duel's schedules."""

    def __init__(self, duel_ms=(2.0, 1.0), search_ms=5.0):
        self.duel_ms, self.search_ms = duel_ms, search_ms
        self.jobs: list[dict] = []
        self.duels: list[tuple[dict, dict]] = []

    def run(self, job, timeout_s):
        if isinstance(job, Duel):
            self.duels.append(job.points)
            sides = [Outcome("ok", ms=ms, check="fake") for ms in self.duel_ms]
            return DuelOutcome(sides, [list(self.duel_ms)] * job.rounds)
        assert isinstance(job, Job)
        self.jobs.append(job.point)
        return Outcome("ok", ms=self.search_ms, check="fake")

    def kill(self):
        pass

    def close(self):
        pass


def record_current(schedule: dict) -> None:
    """The H200's entry builds run today at this shape."""
    entry = db.Entry(kernel=KERNEL, backend="triton", spec_hash=semantic_hash(V32, OP), bucket=bucket_of(S, SKV),
                     shape={"S": S, "SKV": SKV}, schedule=schedule, ms=1.0, tflops=None, gbps=None,
                     pct_of_roofline=None, gpu_type=GPU, device_name="NVIDIA H200", compute_capability="9.0",
                     date="2026-12-01", versions=db.running_versions(), trials=4, sampler="grid", study="earlier",
                     semantics=OP.semantic_fields(V32))
    db.record(db.db_path(GPU), entry)


def tune(tmp_path, worker, variant=None, trials=None, spec=V32):
    req = TuneRequest(spec, KERNEL, S, SKV, device="cuda", gpu_type=GPU, variant=variant, trials=trials,
                      storage=str(tmp_path / "studies.journal"), sampler="grid" if trials is None else "tpe")
    return tune_kernel(req, progress=False, workers=[worker])


def entries():
    return list(db.load(db.db_path(GPU)).entries.values())


def test_a_run_tunes_the_variants_the_device_runs():
    assert tunable_variants(V32, KERNEL, "triton", "cuda", GPU) == ["tl", "gluon", "gluon_split"]
    assert tunable_variants(V32, KERNEL, "triton", "cuda", "nvidia-a100") == ["tl"]
    assert tunable_variants(V32, KERNEL, "triton", "cpu", "cpu-triton-interpreter") == ["tl"]
    assert tunable_variants(V32, KERNEL, "triton", "cuda", GPU, ["gluon_split", "gluon"]) == ["gluon_split", "gluon"]
    assert tunable_variants(V32, "topk", "triton", "cuda", GPU) == [None], "one algorithm: no variant"
    with pytest.raises(ValueError, match=r"variant='gluon' of sparse_attention cannot run on nvidia-a100 "
                                         r"\(compute capability 8.0\): it runs on CUDA GPUs of compute capability 9.0"):
        tunable_variants(V32, KERNEL, "triton", "cuda", "nvidia-a100", ["gluon"])
    with pytest.raises(ValueError, match="cannot run on the CPU"):
        tunable_variants(V32, KERNEL, "triton", "cpu", "cpu-triton-interpreter", ["gluon_split"])


def test_a_spec_that_pins_a_variant_tunes_only_that_one():
    pinned = dsagen.Spec(topk=V32.topk, attention=V32.attention, indexer=V32.indexer,
                         schedule={KERNEL: {"variant": "gluon", "num_stages": 2}})
    assert tunable_variants(pinned, KERNEL, "triton", "cuda", GPU) == ["gluon"]
    with pytest.raises(ValueError, match=r"the spec pins schedule.sparse_attention.variant='gluon'"):
        tunable_variants(pinned, KERNEL, "triton", "cuda", GPU, ["tl"])


def test_a_gluon_split_study_builds_duels_and_records_gluon_split(tmp_path):
    """Builds run a tuned tl schedule; the gluon_split study's candidates, its duel side and the
    recorded entry are gluon_split, and the tl schedule is duelled as tl."""
    tl = {"block_h": 64, "block_n": 32, "num_warps": 8, "num_stages": 2, "v_split": 1, "index_prefetch": 0}
    record_current({"variant": "tl", **tl})
    worker = FakeWorker(duel_ms=(2.0, 1.0))
    r = tune(tmp_path, worker, variant="gluon_split")
    assert r.variant == "gluon_split" and ".sparse_attention.gluon_split.triton." in f".{r.study[7:]}"
    assert r.legal == 4 and worker.jobs and all(p["variant"] == "gluon_split" for p in worker.jobs)
    [(current, winner)] = worker.duels
    assert current == {"variant": "tl", **tl} and winner["variant"] == "gluon_split"
    [entry] = entries()
    assert entry.schedule == winner and set(entry.schedule) == {"variant", "block_n", "num_stages"}
    hit = dsagen.build(V32, gpu=GPU).resolve(KERNEL, S, SKV)
    assert hit.variant == "gluon_split" and {"variant": "gluon_split", **hit.point} == winner


def test_a_tl_study_duels_a_tuned_gluon_split_schedule_as_gluon_split(tmp_path):
    """Builds run a tuned gluon_split schedule: the tl study neither starts from its knobs nor
    builds them as tl; the duel builds it as gluon_split, and it stays when it is faster."""
    split = {"variant": "gluon_split", "block_n": 64, "num_stages": 2}
    record_current(split)
    before = db.db_path(GPU).read_text()
    worker = FakeWorker(duel_ms=(1.0, 2.0))
    r = tune(tmp_path, worker, trials=2)  # the default variant: tl
    assert r.variant == "tl" and r.current_point == split
    # two trials, then their confirmation: every one a whole tl point, none the gluon_split knobs
    assert len(worker.jobs) == 4 and all(p["variant"] == "tl" and "block_h" in p for p in worker.jobs)
    [(current, winner)] = worker.duels
    assert current == split and winner["variant"] == "tl"
    assert r.db_outcome.startswith("nothing recorded: the current schedule (tuned (exact bucket")
    assert db.db_path(GPU).read_text() == before


def test_seeds_of_a_study_are_points_of_its_variant(tmp_path):
    """Entries of the other variants at other buckets are no seeds of a gluon study."""
    record_current({"variant": "gluon", "block_n": 32, "num_stages": 3})
    req = TuneRequest(V32, KERNEL, 1024, 8192, device="cuda", gpu_type=GPU, variant="gluon")
    legal = [{"block_n": n, "num_stages": s} for n in (32, 64) for s in (2, 3)]
    seeds = study_module._seed_points(req, legal, {"block_n": 64, "num_stages": 2})
    assert seeds == [{"block_n": 64, "num_stages": 2}, {"block_n": 32, "num_stages": 3}]
    tl_req = TuneRequest(V32, KERNEL, 1024, 8192, device="cuda", gpu_type=GPU, variant="tl")
    assert study_module._seed_points(tl_req, legal, {"block_n": 64, "num_stages": 2}) == [
        {"block_n": 64, "num_stages": 2}], "the gluon entry is not a tl seed"


def test_cli_variant_errors_are_one_line(tmp_path):
    runner = CliRunner()
    spec = "specs/deepseek_v32.toml"
    base = ["tune", spec, "--device", "cpu", "--S", "4", "--SKV", "300", "--storage", str(tmp_path / "s.journal")]
    for extra, expected in [
        (["-k", KERNEL, "--variant", "gluon"], "error: variant='gluon' of sparse_attention cannot run on the CPU"),
        (["-k", "topk", "--variant", "gluon"], "error: --variant gluon: not a variant of the kernels tuned (topk)"),
        (["-k", KERNEL, "--variant", "gluon_v9"], "error: --variant gluon_v9: no variant of sparse_attention"),
    ]:
        result = runner.invoke(cli.app, [*base, *extra], env={"COLUMNS": "200"})
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(expected), result.output
