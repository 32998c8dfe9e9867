"""Kernel variants (an op's algorithms, each its own template and search space): which one runs
where, how the tuning database names it (today's `variant` key and the older `gluon` knob), and
what `dsagen explain` says."""
from __future__ import annotations

import pytest

import dsagen
from dsagen import db
from dsagen.db.buckets import bucket_of
from dsagen.ops import get_op, semantic_hash
from dsagen.ops.base import Where

V32 = dsagen.load_spec("specs/deepseek_v32.toml")
OP = get_op("sparse_attention")
DEVICE_NAMES = {"nvidia-h200": "NVIDIA H200", "nvidia-a100": "NVIDIA A100-SXM4-80GB"}


@pytest.fixture(autouse=True)
def _private_user_dir(tmp_path, monkeypatch):
    """Only this test's entries: a private user folder, and no shipped database."""
    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("dsagen.db.store.shipped_db_dir", lambda: tmp_path / "no-shipped-db")


def record(schedule, gpu="nvidia-h200", cc="9.0", S=4096, SKV=32768):
    entry = db.Entry(kernel="sparse_attention", backend="triton", spec_hash=semantic_hash(V32, OP),
                     bucket=bucket_of(S, SKV), shape={"S": S, "SKV": SKV}, schedule=schedule, ms=1.0, tflops=None,
                     gbps=None, pct_of_roofline=None, gpu_type=gpu, device_name=DEVICE_NAMES[gpu],
                     compute_capability=cc, date="2026-12-01", versions=db.running_versions(), trials=4,
                     sampler="tpe", study="test", semantics=OP.semantic_fields(V32))
    db.record(db.db_path(gpu), entry)


def resolve(gpu="nvidia-h200", device_type="cuda", spec=V32):
    return dsagen.build(spec, gpu=gpu).resolve("sparse_attention", 4096, 32768, device_type)


def test_the_default_variant_is_the_first_that_may_run():
    assert [v.name for v in OP.runnable_variants("triton", Where("cuda", (9, 0)))] == ["tl", "gluon", "gluon_split"]
    assert [v.name for v in OP.runnable_variants("triton", Where("cuda", (8, 0)))] == ["tl"]
    assert [v.name for v in OP.runnable_variants("triton", Where("cpu"))] == ["tl"]
    assert [v.name for v in OP.variants_for("tvm")] == [None], "TVM has one algorithm"
    assert resolve().variant == "tl"


def test_a_tuned_variant_answers_on_its_gpu_generation():
    record({"variant": "gluon_split", "block_n": 32, "num_stages": 3})
    hit = resolve()
    assert hit.variant == "gluon_split" and hit.point == {"block_n": 32, "num_stages": 3}
    assert "_gluon_split_n32_s3_" in hit.module_name and "@gluon.jit" in hit.generated.source


def test_compute_capability_8_never_gets_a_gluon_variant():
    """An A100 file holding a Gluon entry (say, copied by hand): passed over, the tl default runs."""
    record({"variant": "gluon", "block_n": 64, "num_stages": 2}, gpu="nvidia-a100", cc="8.0")
    hit = resolve("nvidia-a100")
    assert hit.variant == "tl" and not hit.source.startswith("tuned")
    assert "@gluon.jit" not in hit.generated.source


def test_the_interpreter_never_runs_a_gluon_variant():
    spec = dsagen.Spec(topk=V32.topk, attention=V32.attention,
                       schedule={"sparse_attention": {"variant": "gluon", "block_n": 32}})
    hit = resolve(device_type="cpu", spec=spec)
    assert hit.variant == "tl" and hit.point["block_n"] == 32
    assert hit.module_name.startswith("sparse_attention_h128_dqk576_dv512_bf16_tl_") and "_interp_" in hit.module_name


@pytest.mark.parametrize("gluon,variant,point", [
    (0, "tl", {"block_h": 32, "block_n": 32, "num_warps": 4, "num_stages": 3, "v_split": 2, "index_prefetch": 1}),
    (1, "gluon", {"block_n": 32, "num_stages": 3}),
    (2, "gluon_split", {"block_n": 32, "num_stages": 4}),
])
def test_an_old_entry_with_the_gluon_knob_answers_as_its_variant(gluon, variant, point):
    old = {"block_h": 64, "num_warps": 8, "v_split": 1, "index_prefetch": 0, **point, "gluon": gluon}
    record(old)
    hit = resolve()
    assert hit.variant == variant and hit.point == point and hit.source.startswith("tuned (exact bucket")


def test_a_pinned_variant_passes_over_an_entry_of_another():
    record({"variant": "gluon_split", "block_n": 64, "num_stages": 2})
    spec = dsagen.Spec(topk=V32.topk, attention=V32.attention, schedule={"sparse_attention": {"variant": "gluon"}})
    hit = resolve(spec=spec)
    assert hit.variant == "gluon" and hit.source == "pinned+default"


def test_an_unknown_variant_in_an_entry_is_passed_over():
    record({"variant": "gluon_v9", "block_n": 64, "num_stages": 2})
    assert resolve().variant == "tl"


def test_explain_names_the_variant():
    record({"variant": "gluon_split", "block_n": 64, "num_stages": 2})
    info = dsagen.build(V32, gpu="nvidia-h200").explain(4096, 32768)["sparse_attention"]
    assert info["variant"] == "gluon_split" and info["schedule"] == {"block_n": 64, "num_stages": 2}


def test_cli_explain_prints_the_variant(tmp_path):
    from typer.testing import CliRunner

    import cli

    record({"variant": "gluon_split", "block_n": 64, "num_stages": 2})
    result = CliRunner().invoke(cli.app, ["explain", "specs/deepseek_v32.toml", "--gpu", "nvidia-h200"])
    assert result.exit_code == 0, result.output
    assert "sparse_attention  variant=gluon_split block_n=64 num_stages=2" in result.output
    pinned = tmp_path / "pinned.toml"
    pinned.write_text(open("specs/deepseek_v32.toml").read()
                      + '\n[schedule.sparse_attention]\nvariant = "gluon"\nblock_n = 32\n')
    result = CliRunner().invoke(cli.app, ["explain", str(pinned), "--gpu", "nvidia-h200"])
    assert result.exit_code == 0, result.output
    assert "variant=gluon block_n=32 num_stages=2" in result.output


def test_prune_checks_each_entry_against_its_own_variant(tmp_path):
    """The shipped Gluon entries fit their variants' spaces and stay; an old `gluon` entry is read as
    its variant; a Gluon entry with a tl knob, or of an unknown variant, is dropped."""
    import shutil

    from typer.testing import CliRunner

    import cli

    for name in ("nvidia-h200", "nvidia-h100"):
        shipped = tmp_path / f"{name}.json"
        shutil.copy(f"autotune_db/{name}.json", shipped)
        before = shipped.read_text()
        result = CliRunner().invoke(cli.app, ["db", "prune", str(shipped), "--dry-run"])
        assert result.exit_code == 0 and f"0 entries would be dropped from {shipped}" in result.output, result.output
        assert shipped.read_text() == before
    kept = [{"variant": "gluon_split", "block_n": 64, "num_stages": 2},
            {"block_h": 64, "num_warps": 8, "v_split": 1, "index_prefetch": 0, "block_n": 32, "num_stages": 3,
             "gluon": 1}]
    dropped = [{"variant": "gluon", "block_n": 64, "num_stages": 2, "block_h": 64},
               {"variant": "gluon_v9", "block_n": 64, "num_stages": 2}]
    for i, schedule in enumerate(kept + dropped):
        record(schedule, S=2 ** (10 + i))  # one bucket each
    path = db.db_path("nvidia-h200")
    result = CliRunner().invoke(cli.app, ["db", "prune", str(path)])
    assert result.exit_code == 0 and "2 entries dropped" in result.output, result.output
    assert [e.schedule for e in db.load(path).entries.values()] == kept
