"""A spec with a head count nobody tuned takes the tuned entry of the nearest head count (when its
schedule is legal there), through entries that record their semantic fields."""
from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

import cli
from dsagen.ops import semantic_hash
import dsagen
from dsagen import db
from dsagen.db.buckets import bucket_of
from dsagen.ops import get_op

GPU = "nvidia-h200"
SIBLING = "nvidia-h100"  # the same compute capability (9.0); no file of its own unless a test records one
DEVICE_NAMES = {GPU: "NVIDIA H200", SIBLING: "NVIDIA H100 80GB HBM3"}
V32 = dsagen.load_spec("specs/deepseek_v32.toml")


@pytest.fixture(autouse=True)
def _private_user_dir(tmp_path, monkeypatch):
    """Only this test's entries: a private user folder, and no shipped database (whose H200 entries
    would be neighbours too)."""
    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("dsagen.db.store.shipped_db_dir", lambda: tmp_path / "no-shipped-db")


def with_index_heads(heads: int, head_dim: int = 128):
    return dataclasses.replace(V32, indexer=dataclasses.replace(V32.indexer, heads=heads, head_dim=head_dim))


def indexer_entry(spec, schedule, S=4096, SKV=32768, semantics=True, gpu=GPU, cc="9.0") -> db.Entry:
    op = get_op("indexer")
    return db.Entry(kernel="indexer", backend="triton", spec_hash=semantic_hash(spec, "indexer"), bucket=bucket_of(S, SKV),
                    shape={"S": S, "SKV": SKV}, schedule=schedule, ms=1.0, tflops=None, gbps=None,
                    pct_of_roofline=None, gpu_type=gpu, device_name=DEVICE_NAMES.get(gpu, gpu), compute_capability=cc,
                    date="2026-11-29", versions=db.running_versions(), trials=4, sampler="tpe", study="test",
                    semantics=op.semantic_fields(spec) if semantics else None)


def point(**knobs):
    return {"block_m": 16, "block_h": 1, "block_n": 128, "num_warps": 4, "num_stages": 3, **knobs}


AT_64 = point(block_m=64, num_stages=4)
AT_16 = point(block_m=8, block_h=16, num_warps=8)


def resolve(heads: int, head_dim: int = 128, gpu: str = GPU):
    return dsagen.build(with_index_heads(heads, head_dim), gpu=gpu).resolve("indexer", 4096, 32768, "cuda")


def record(*entries: db.Entry) -> None:
    for e in entries:
        db.record(db.db_path(e.gpu_type), e)


@pytest.mark.parametrize("heads,want,tuned", [(48, AT_64, 64), (24, AT_16, 16), (128, AT_64, 64), (10, AT_16, 16)],
                         ids=["H48-from-64", "H24-from-16", "H128-from-64", "H10-from-16"])
def test_an_unseen_head_count_takes_the_nearest_tuned_one(heads, want, tuned):
    record(indexer_entry(with_index_heads(64), AT_64), indexer_entry(with_index_heads(16), AT_16))
    hit = resolve(heads)
    assert hit.point == want
    assert f"tuned for heads={tuned} (nearest to heads={heads})" in hit.source


def test_the_spec_own_entry_wins_over_a_neighbour():
    own = point(block_m=32, block_h=2)
    record(indexer_entry(with_index_heads(64), AT_64), indexer_entry(with_index_heads(48), own))
    hit = resolve(48)
    assert hit.point == own and hit.source.startswith("tuned (exact bucket")


def test_a_neighbour_whose_schedule_is_illegal_here_is_passed_over():
    """block_h = 16 is illegal for 8 heads: the legal, farther neighbour answers."""
    record(indexer_entry(with_index_heads(16), AT_16), indexer_entry(with_index_heads(64), AT_64))
    hit = resolve(8)
    assert hit.point == AT_64 and "tuned for heads=64" in hit.source


def test_only_the_head_count_may_differ():
    record(indexer_entry(with_index_heads(64, head_dim=64), AT_64))
    hit = resolve(32)
    assert "tuned" not in hit.source  # another head_dim is not a neighbour: the defaults answer


def test_entries_without_recorded_semantics_are_no_neighbours():
    record(indexer_entry(with_index_heads(64), AT_64, semantics=False))
    assert "tuned" not in resolve(32).source


# ------------------------------------------------------------------------------------------------
# a GPU type without entries of its own borrows a sibling's of the same compute capability, tiers and all

BORROWED = "tuned on nvidia-h200 (same compute capability 9.0) for heads=32 (nearest to heads=64)"


def test_a_sibling_gpu_s_nearest_head_count_serves_a_gpu_without_its_own_file():
    """The H100 has no file: the H200's entry tuned for 32 heads answers a 64-head spec, as it
    does on the H200, and the source says both that it was borrowed and that it is a neighbour."""
    record(indexer_entry(with_index_heads(32), AT_64))
    on_h200, on_h100 = resolve(64), resolve(64, gpu=SIBLING)
    assert on_h200.point == on_h100.point == AT_64
    assert on_h100.source.startswith(BORROWED + ", bucket S4096-SKV32768, ")
    assert on_h100.source.endswith("nvidia-h200.json")


def test_a_sibling_s_neighbour_must_be_legal_here():
    """block_h = 16 does not fit 8 heads: the sibling's legal, farther neighbour answers."""
    record(indexer_entry(with_index_heads(16), AT_16), indexer_entry(with_index_heads(64), AT_64))
    hit = resolve(8, gpu=SIBLING)
    assert hit.point == AT_64 and "tuned on nvidia-h200 (same compute capability 9.0) for heads=64" in hit.source


def test_a_neighbour_tuned_on_another_compute_capability_serves_no_sibling():
    """A GPU type dsagen does not know may hold entries of any compute capability: only 9.0 ones
    serve the H100."""
    record(indexer_entry(with_index_heads(32), AT_64, gpu="nvidia-l40", cc="8.9"))
    assert "tuned" not in resolve(64, gpu=SIBLING).source


@pytest.mark.parametrize("own_heads,source", [(64, "tuned (exact bucket S4096-SKV32768)"),
                                              (16, "tuned for heads=16 (nearest to heads=64)")],
                         ids=["own-exact", "own-farther-neighbour"])
def test_a_gpu_s_own_entry_wins_over_a_sibling_s(own_heads, source):
    """The H100's own file answers before the H200's, even with a farther head count."""
    own = point(block_m=32, block_h=2)
    record(indexer_entry(with_index_heads(32), AT_64), indexer_entry(with_index_heads(own_heads), own, gpu=SIBLING))
    hit = resolve(64, gpu=SIBLING)
    assert hit.point == own and hit.source.startswith(source + ", ") and "nvidia-h100.json" in hit.source


def test_explain_and_check_say_the_schedule_is_a_sibling_s_neighbour():
    record(indexer_entry(with_index_heads(32), AT_64))
    for command in ("explain", "check"):
        result = CliRunner().invoke(cli.app, [command, "specs/deepseek_v32.toml", "--gpu", SIBLING],
                                    env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert result.exit_code == 0, result.output
        assert f"from: {BORROWED}, bucket S4096-SKV32768, " in result.output, result.output


def test_annotate_fills_in_the_fields_of_matching_entries(tmp_path):
    path = db.db_path(GPU)
    record(indexer_entry(with_index_heads(64), AT_64, semantics=False),
           indexer_entry(with_index_heads(16), AT_16, semantics=False))
    spec_file = "specs/deepseek_v32.toml"  # its indexer: 64 heads x 128, fp8
    result = CliRunner().invoke(cli.app, ["db", "annotate", str(path), str(spec_file)])
    assert result.exit_code == 0, result.output
    assert "1 entries" in result.output
    entries = {e.semantics["heads"] if e.semantics else None: e for e in db.load(path).entries.values()}
    assert set(entries) == {64, None}  # the 16-head entry matched no given spec
    assert "tuned for heads=64 (nearest to heads=32)" in resolve(32).source
    missing = CliRunner().invoke(cli.app, ["db", "annotate", str(tmp_path / "nvidia-h100.json"), str(spec_file)])
    assert missing.exit_code == 1 and "no such database file" in missing.output


def test_semantics_are_validated_when_read(tmp_path):
    path = db.db_path(GPU)
    record(indexer_entry(with_index_heads(64), AT_64))
    text = path.read_text().replace('"heads": 64', '"heads": -3')
    path.write_text(text)
    with pytest.raises(db.TuningDBError, match="semantics"):
        db.load(path)


def test_a_study_starts_from_the_schedule_a_build_runs_now():
    """Tuning an unseen head count seeds TPE with the nearest tuned head count's schedule (what a
    build runs today) before the untuned default, so its winner cannot be worse than that point."""
    from dsagen.resolve import Resolver
    from dsagen.tuning.study import TuneRequest, _built_point, _seed_points
    from dsagen.plan import problem_symbols
    from dsagen.schedule import load_space
    from dsagen.gpus import get_gpu

    record(indexer_entry(V32, AT_64))
    spec32 = with_index_heads(32)
    req = TuneRequest(spec32, "indexer", 4096, 32768, device="cuda", gpu_type=GPU)
    built = _built_point(req)
    assert built == AT_64
    space = load_space("triton", "indexer")
    legal = space.legal_points(problem_symbols(spec32, get_op("indexer"), get_gpu(GPU)))
    untuned = Resolver(spec32, "triton", GPU, use_db=False).resolve("indexer", device_type="cuda").point
    seeds = _seed_points(req, legal, untuned, built)
    assert seeds[0] == AT_64 and seeds[1] == untuned
