"""The per-GPU tuning database (dsagen.db), its shape buckets, its file writes and `dsagen db`.

Everything runs on files under tmp_path; DSAGEN_CACHE_DIR points into tmp_path too, so the user's
real tuning database is never read or written.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import dsagen
from dsagen import db
from dsagen.db.buckets import SHAPE_SETS, bucket_distance, bucket_of, parse_bucket
from dsagen.db.store import UNREADABLE_HINT
from dsagen.errors import DsagenError
from dsagen.fileio import CacheDirError, atomic_write_text, file_lock, make_dirs
from dsagen.cli.db import db_app

HASH = "0123456789abcdef"
OTHER_HASH = "fedcba9876543210"


@pytest.fixture(autouse=True)
def _private_user_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(tmp_path / "cache"))


def make_entry(**changes) -> db.Entry:
    """A valid entry tuned with the running versions; S/SKV set shape and bucket together."""
    S, SKV = changes.pop("S", 4096), changes.pop("SKV", 32768)
    fields = dict(
        kernel="sparse_attention", backend="triton", spec_hash=HASH, bucket=bucket_of(S, SKV),
        shape={"S": S, "SKV": SKV}, schedule={"block_h": 64, "num_warps": 4}, ms=1.5, tflops=120.0,
        gbps=None, pct_of_roofline=61.5, gpu_type="nvidia-h200", device_name="NVIDIA H200",
        compute_capability="9.0", date="2026-11-28", versions=db.running_versions(), trials=12,
        sampler="grid", study="v32-sparse_attention",
    )
    fields.update(changes)
    return db.Entry(**fields)


def write_db(path: Path, *entries: db.Entry) -> Path:
    db.save(db.TuningDB(path, path.stem, {e.key: e for e in entries}))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(db.TuningDBError) as info:
        db.load(path)
    return str(info.value)


# ------------------------------------------------------------------------------------------------
# buckets


@pytest.mark.parametrize("S, SKV, bucket", [
    (1, 1, "S1-SKV1"), (4096, 32768, "S4096-SKV32768"), (4097, 32767, "S8192-SKV32768"),
    (3, 5000, "S4-SKV8192"),
], ids=["ones", "powers-of-two-stay", "round-up-each", "small"])
def test_bucket_of_rounds_up_to_powers_of_two(S, SKV, bucket):
    assert bucket_of(S, SKV) == bucket
    assert parse_bucket(bucket) == tuple(int(n) for n in re.findall(r"\d+", bucket))


@pytest.mark.parametrize("S, SKV, name", [(0, 8, "S"), (8, -1, "SKV"), (2.0, 8, "S"), (True, 8, "S")],
                         ids=["S-zero", "SKV-negative", "S-float", "S-bool"])
def test_bucket_of_rejects_bad_sizes(S, SKV, name):
    with pytest.raises(ValueError, match=f"^{name} must be an integer >= 1"):
        bucket_of(S, SKV)


@pytest.mark.parametrize("text", ["S4096", "S3000-SKV8192", "S4096-SKV0", "s4096-skv8192", "S04096-SKV8192",
                                  "S4096-SKV8192 ", ""],
                         ids=["no-SKV", "not-pow2", "zero", "lowercase", "leading-zero", "trailing-space", "empty"])
def test_parse_bucket_rejects_bad_text(text):
    with pytest.raises(ValueError, match=r"S<pow2>-SKV<pow2>") as info:
        parse_bucket(text)
    assert repr(text) in str(info.value)


def test_bucket_distance():
    assert bucket_distance("S4096-SKV32768", "S4096-SKV32768") == 0
    assert bucket_distance("S1024-SKV8192", "S4096-SKV32768") == 4
    assert bucket_distance("S4096-SKV8192", "S2048-SKV16384") == 2


def test_shape_sets():
    assert SHAPE_SETS["v32"] == [(1024, 8192), (1024, 32768), (1024, 131072),
                                 (4096, 8192), (4096, 32768), (4096, 131072)]
    assert SHAPE_SETS["smoke"] == [(256, 4096)]
    assert SHAPE_SETS["decode"] == [(2, 32768), (2, 131072), (32, 32768), (32, 131072), (128, 32768), (128, 131072)]


# ------------------------------------------------------------------------------------------------
# file format


def test_round_trip_and_one_entry_per_line(tmp_path):
    entries = [make_entry(), make_entry(S=1024, SKV=8192, ms=0.25),
               make_entry(kernel="indexer", schedule={"block_n": 128}, tflops=None, pct_of_roofline=None)]
    path = write_db(tmp_path / "nvidia-h200.json", *entries)
    text = path.read_text()
    data = json.loads(text)
    assert data["format"] == "dsagen-autotune-db" and data["version"] == 1 and data["gpu_type"] == "nvidia-h200"
    lines = text.splitlines()
    assert len(lines) == 2 + len(entries) + 1  # header, '"entries": [', one line each, ' ]}'
    assert [json.loads(line.strip().rstrip(",")) for line in lines[2:-1]] == data["entries"]
    keys = [(e["kernel"], e["bucket"]) for e in data["entries"]]
    assert keys == [("indexer", "S4096-SKV32768"), ("sparse_attention", "S1024-SKV8192"),
                    ("sparse_attention", "S4096-SKV32768")]  # sorted by key
    loaded = db.load(path)
    assert loaded.gpu_type == "nvidia-h200"
    assert loaded.entries == {e.key: e for e in entries}
    assert db.dump(loaded) == text


def test_missing_file_is_an_empty_db(tmp_path):
    loaded = db.load(tmp_path / "nvidia-a100.json")
    assert (loaded.gpu_type, loaded.entries) == ("nvidia-a100", {})
    assert json.loads(db.dump(loaded))["entries"] == []


@pytest.mark.parametrize("gpu_type", ["../etc", "NVIDIA H200", "", "-x", "a/b"],
                         ids=["dotdot", "spaces-upper", "empty", "leading-dash", "slash"])
def test_db_path_rejects_gpu_types_that_are_not_file_names(gpu_type, tmp_path):
    with pytest.raises(ValueError, match="bad GPU type"):
        db.db_path(gpu_type, tmp_path)


def test_db_path_default_is_the_user_dir(tmp_path):
    assert db.db_path("nvidia-h200") == tmp_path / "cache" / "autotune_db" / "nvidia-h200.json"


# ------------------------------------------------------------------------------------------------
# validation errors name file:line


def _three_entry_file(tmp_path) -> tuple[Path, list[str]]:
    path = write_db(tmp_path / "nvidia-h200.json", make_entry(S=1024), make_entry(S=2048), make_entry(S=4096))
    return path, path.read_text().splitlines()


def _set_entry_line(path: Path, lines: list[str], number: int, change) -> None:
    """Apply change(dict) to the entry written on line `number` (1-based)."""
    raw = lines[number - 1]
    comma = raw.endswith(",")
    entry = json.loads(raw.strip().rstrip(","))
    change(entry)
    lines[number - 1] = "  " + json.dumps(entry) + ("," if comma else "")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(ms="fast"), """entry field 'ms' must be a number > 0, got "fast\""""),
    (lambda e: e.update(ms=0), "entry field 'ms' must be a number > 0, got 0"),
    (lambda e: e.update(trials=1.5), "entry field 'trials' must be an integer >= 0, got 1.5"),
    (lambda e: e.update(schedule={"block_h": "64"}), "entry field 'schedule' must be an object of knob -> integer"),
    (lambda e: e.pop("date"), "entry is missing field 'date'"),
    (lambda e: e.update(kernel="Flash-Attn"), "entry field 'kernel' must be a kernel name like \"sparse_attention\" "
     "(lowercase letters, digits and '_', starting with a letter), got \"Flash-Attn\""),
    (lambda e: e.update(spec_hash="abc"), "entry field 'spec_hash' must be 16 lowercase hex characters"),
    (lambda e: e.update(bucket="S4000-SKV8192"), "entry field 'bucket' must be a bucket"),
    (lambda e: e.update(bucket="S1024-SKV8192"), "entry field 'bucket' is \"S1024-SKV8192\" but shape S=2048"),
    (lambda e: e.update(date="yesterday"), "entry field 'date' must be an ISO date string"),
    (lambda e: e["versions"].pop("cuda"), "entry field 'versions' must be an object with exactly the keys"),
    (lambda e: e.update(speedup=2), "entry has unknown field 'speedup'"),
    (lambda e: e.update(gpu_type="nvidia-h100"), "entry field 'gpu_type' is \"nvidia-h100\" but this is the file of"),
], ids=["ms-string", "ms-zero", "trials-float", "schedule-value-string", "missing-date", "bad-kernel-name",
        "short-spec-hash", "bucket-not-pow2", "bucket-not-the-shapes", "bad-date", "versions-missing-cuda",
        "unknown-field", "entry-of-another-gpu"])
def test_bad_entry_names_file_and_line(tmp_path, change, message):
    path, lines = _three_entry_file(tmp_path)
    _set_entry_line(path, lines, 4, change)  # line 4: the second entry
    assert error_of(path).startswith(f"{path}:4: {message}")


def test_bad_json_names_the_line(tmp_path):
    path, lines = _three_entry_file(tmp_path)
    lines[3] = lines[3].replace('"ms": 1.5', '"ms": 1.5,,')
    path.write_text("\n".join(lines) + "\n")
    assert re.match(rf"{re.escape(str(path))}:4: invalid JSON: ", error_of(path))


def test_duplicate_key_names_both_lines(tmp_path):
    path, lines = _three_entry_file(tmp_path)
    lines[4] = lines[2].rstrip(",")  # the third entry becomes a copy of the first
    path.write_text("\n".join(lines) + "\n")
    message = error_of(path)
    assert message.startswith(f"{path}:5: duplicate entry (kernel=sparse_attention")
    assert "lines 3 and 5" in message


@pytest.mark.parametrize("text, line, message", [
    ('[1, 2]\n', 1, "the top level must be a JSON object"),
    ('\n\n"x"\n', 3, "the top level must be a JSON object"),
    ('{"format": "something-else", "version": 1,\n "gpu_type": "nvidia-h200", "entries": []}', 1,
     "'format' must be \"dsagen-autotune-db\""),
    ('{"format": "dsagen-autotune-db",\n "version": 2,\n "gpu_type": "nvidia-h200", "entries": []}', 2,
     "unsupported 'version' 2"),
    ('{"format": "dsagen-autotune-db", "version": 1,\n "gpu_type": "nvidia-h100",\n "entries": []}', 2,
     "'gpu_type' is \"nvidia-h100\" but the file is named nvidia-h200.json"),
    ('{"format": "dsagen-autotune-db", "version": 1, "gpu_type": "nvidia-h200"}', 1,
     "missing top-level key 'entries'"),
    ('{"format": "dsagen-autotune-db", "version": 1, "gpu_type": "nvidia-h200",\n "entries": {}}', 2,
     "'entries' must be a JSON array"),
    ('{"format": "dsagen-autotune-db", "version": 1, "gpu_type": "nvidia-h200",\n "entries": [],\n "x": 1}', 3,
     "unknown top-level key 'x'"),
], ids=["array", "string-after-blank-lines", "wrong-format", "version-2", "gpu-type-mismatch", "no-entries",
        "entries-not-array", "unknown-top-key"])
def test_bad_top_level_names_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "nvidia-h200.json"
    path.write_text(text)
    assert error_of(path).startswith(f"{path}:{line}: {message}")


def test_hand_reformatted_file_names_the_entry_start_line(tmp_path):
    path, _ = _three_entry_file(tmp_path)
    data = json.loads(path.read_text())
    data["entries"][2]["ms"] = -1
    text = json.dumps(data, indent=2)  # every field on its own line now
    path.write_text(text)
    lines = text.splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if line == "    {"]
    assert len(starts) == 3 and starts[2] > 50
    assert error_of(path).startswith(f"{path}:{starts[2]}: entry field 'ms' must be a number > 0, got -1")


def test_odd_spacing_with_brackets_inside_strings(tmp_path):
    """Entry lines are found by walking the JSON, not by looking for braces or newlines."""
    good = make_entry(S=1024, study="a [tricky] {name},\n").to_json()
    bad = dict(make_entry().to_json(), sampler="")
    text = ('{\n"entries"\n:\n[ ' + json.dumps(good) + '\n,\n\n\t' + json.dumps(bad) + ' ] ,"gpu_type":"nvidia-h200",'
            '\n"format":"dsagen-autotune-db","version":1}')
    path = tmp_path / "nvidia-h200.json"
    path.write_text(text)
    assert error_of(path).startswith(f"{path}:7: entry field 'sampler' must be a non-empty string")


# ------------------------------------------------------------------------------------------------
# record


def test_record_add_replace_keep(tmp_path):
    path = tmp_path / "nvidia-h200.json"
    first = make_entry(ms=2.0)
    assert db.record(path, first) == "added"
    assert db.record(path, make_entry(ms=1.0, schedule={"block_h": 32})) == "replaced"  # faster
    assert db.record(path, make_entry(ms=3.0, schedule={"block_h": 16})) == "kept: existing entry is faster (1 ms)"
    assert db.load(path).entries[first.key].schedule == {"block_h": 32}
    # the same schedule measured again replaces, even when slower (the newer measurement counts)
    assert db.record(path, make_entry(ms=1.2, schedule={"block_h": 32})) == "replaced"
    assert db.load(path).entries[first.key].ms == 1.2
    assert db.record(path, make_entry(S=1024)) == "added"  # another bucket
    assert len(db.load(path).entries) == 2


def test_record_replaces_a_stale_entry_even_if_it_was_faster(tmp_path):
    path = tmp_path / "nvidia-h200.json"
    old_versions = dict(db.running_versions(), torch="2.11.0")
    db.record(path, make_entry(ms=0.5, versions=old_versions))
    new = make_entry(ms=0.9, schedule={"block_h": 16})
    assert db.record(path, new) == "replaced"
    assert db.load(path).entries[new.key] == new


def test_record_refuses_an_entry_of_another_gpu_type(tmp_path):
    with pytest.raises(db.TuningDBError, match="nvidia-h100"):
        db.record(tmp_path / "nvidia-h200.json", make_entry(gpu_type="nvidia-h100"))


def test_record_validates_the_entry_before_writing(tmp_path):
    path = tmp_path / "nvidia-h200.json"
    with pytest.raises(db.TuningDBError, match="entry field 'ms' must be a number > 0"):
        db.record(path, make_entry(ms=float("nan")))
    assert not path.exists()


def test_record_never_writes_over_a_corrupt_file(tmp_path):
    path = write_db(tmp_path / "nvidia-h200.json", make_entry(S=1024), make_entry(S=2048))
    corrupt = path.read_bytes().replace(b'"ms": 1.5', b'"ms": "x"', 1)
    path.write_bytes(corrupt)
    with pytest.raises(db.TuningDBError, match=rf"^{re.escape(str(path))}:3: entry field 'ms'"):
        db.record(path, make_entry(S=8192))
    assert path.read_bytes() == corrupt


def test_a_crash_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = write_db(tmp_path / "db" / "nvidia-h200.json", make_entry(S=1024))
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        db.record(path, make_entry(S=2048))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [".nvidia-h200.json.lock", "nvidia-h200.json"]


def _record_five(path: str, worker: int, start) -> None:
    start.wait()
    for i in range(5):
        entry = make_entry(spec_hash=f"{worker:08x}{i:08x}")
        assert db.record(Path(path), entry) == "added"


def test_concurrent_record_from_eight_processes_keeps_every_entry(tmp_path):
    path = tmp_path / "nvidia-h200.json"
    context = multiprocessing.get_context("fork")
    start = context.Event()
    workers = [context.Process(target=_record_five, args=(str(path), w, start)) for w in range(8)]
    for p in workers:
        p.start()
    start.set()
    for p in workers:
        p.join(60)
    assert [p.exitcode for p in workers] == [0] * 8
    assert len(db.load(path).entries) == 40


# ------------------------------------------------------------------------------------------------
# merge


def test_merge_counts_and_faster_wins(tmp_path):
    a = write_db(tmp_path / "a" / "nvidia-h200.json",
                 make_entry(S=1024, ms=1.0), make_entry(S=2048, ms=2.0), make_entry(S=4096, ms=3.0, date="2026-01-01"))
    b = write_db(tmp_path / "b" / "nvidia-h200.json",
                 make_entry(S=1024, ms=1.5, schedule={"block_h": 8}),  # slower: kept
                 make_entry(S=2048, ms=1.0, schedule={"block_h": 8}),  # faster: replaced
                 make_entry(S=4096, ms=3.0, date="2026-02-01", schedule={"block_h": 8}),  # tie, later: replaced
                 make_entry(S=8192))  # new: added
    assert db.merge(a, b) == {"added": 1, "replaced": 2, "kept": 1, "total": 4}
    merged = {e.bucket: e for e in db.load(a).entries.values()}
    assert merged["S1024-SKV32768"].ms == 1.0
    assert merged["S2048-SKV32768"].schedule == {"block_h": 8}
    assert merged["S4096-SKV32768"].date == "2026-02-01"


def test_merge_into_out_leaves_a_alone(tmp_path):
    a = write_db(tmp_path / "a" / "nvidia-h200.json", make_entry(S=1024))
    b = write_db(tmp_path / "b" / "nvidia-h200.json", make_entry(S=2048))
    before = a.read_bytes()
    out = tmp_path / "out" / "nvidia-h200.json"
    assert db.merge(a, b, out)["total"] == 2
    assert a.read_bytes() == before and len(db.load(out).entries) == 2


def test_merge_refuses_different_gpu_types(tmp_path):
    a = write_db(tmp_path / "nvidia-h200.json", make_entry())
    b = write_db(tmp_path / "nvidia-h100.json", make_entry(gpu_type="nvidia-h100"))
    with pytest.raises(db.TuningDBError) as info:
        db.merge(a, b)
    assert str(a) in str(info.value) and str(b) in str(info.value)


# ------------------------------------------------------------------------------------------------
# lookup


def _lookup(dirs, S=4096, SKV=32768, gpu_type="nvidia-h200", compute_capability="9.0", spec_hash=HASH):
    return db.lookup(kernel="sparse_attention", backend="triton", spec_hash=spec_hash, S=S, SKV=SKV,
                     gpu_type=gpu_type, compute_capability=compute_capability, dirs=dirs)


def test_lookup_order_exact_nearest_same_cc_none(tmp_path):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    write_db(user / "nvidia-h200.json", make_entry(S=4096, SKV=32768), make_entry(S=4096, SKV=8192))
    write_db(shipped / "nvidia-h100.json", make_entry(S=1024, SKV=8192, gpu_type="nvidia-h100", ms=0.7))
    write_db(shipped / "nvidia-a100.json", make_entry(S=2048, SKV=8192, gpu_type="nvidia-a100",
                                                    compute_capability="8.0"))
    dirs = [user, shipped, tmp_path / "missing"]

    found = _lookup(dirs, S=3000, SKV=20000)
    assert found.source == "tuned (exact bucket S4096-SKV32768)" and found.path == user / "nvidia-h200.json"

    found = _lookup(dirs, S=2048, SKV=8192)
    assert found.source == "tuned (nearest bucket S4096-SKV8192 for S2048-SKV8192)"

    found = _lookup(dirs, S=2048, SKV=16384)  # S4096-SKV8192 and S4096-SKV32768 tie: the larger wins
    assert found.entry.bucket == "S4096-SKV32768"

    found = _lookup(dirs, S=1024, SKV=8192, gpu_type="nvidia-h20", compute_capability="9.0")
    assert found.source == "tuned on nvidia-h100 (same compute capability 9.0, bucket S1024-SKV8192)"
    assert found.entry.ms == 0.7

    found = _lookup(dirs, S=256, SKV=4096, gpu_type="nvidia-h20", compute_capability="9.0")
    assert found.source.startswith("tuned on nvidia-h") and "nearest bucket" in found.source

    found = _lookup(dirs, S=2048, SKV=8192, gpu_type="nvidia-a10g", compute_capability="8.0")
    assert found.source == "tuned on nvidia-a100 (same compute capability 8.0, bucket S2048-SKV8192)"

    assert _lookup(dirs, gpu_type="nvidia-b200", compute_capability="10.0") is None
    assert _lookup(dirs, gpu_type="nvidia-b200", compute_capability=None) is None
    assert _lookup(dirs, spec_hash=OTHER_HASH) is None
    assert _lookup([tmp_path / "nowhere"]) is None


def test_lookup_takes_a_known_gpus_compute_capability_from_dsagen_gpus(tmp_path):
    write_db(tmp_path / "nvidia-h200.json", make_entry())
    found = _lookup([tmp_path], gpu_type="nvidia-h100", compute_capability=None)
    assert found.source == "tuned on nvidia-h200 (same compute capability 9.0, bucket S4096-SKV32768)"


def test_lookup_user_entry_beats_shipped_entry(tmp_path):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    write_db(user / "nvidia-h200.json", make_entry(ms=2.0, schedule={"block_h": 32}))
    write_db(shipped / "nvidia-h200.json", make_entry(ms=1.0, schedule={"block_h": 64}))
    found = _lookup([user, shipped])
    assert found.entry.schedule == {"block_h": 32} and found.path == user / "nvidia-h200.json"
    assert _lookup([shipped, user]).entry.schedule == {"block_h": 64}


def test_lookup_defaults_to_the_user_dir(tmp_path):
    db.record(db.db_path("nvidia-h200"), make_entry())
    assert _lookup(None).path == tmp_path / "cache" / "autotune_db" / "nvidia-h200.json"


def test_lookup_returns_stale_entries_with_their_stale_fields(tmp_path):
    write_db(tmp_path / "nvidia-h200.json", make_entry(versions=dict(db.running_versions(), torch="2.11.0")))
    found = _lookup([tmp_path])
    assert found.stale == [f"torch 2.11.0 != {db.running_versions()['torch']}"]
    assert _lookup([tmp_path]).entry.versions["torch"] == "2.11.0"


def test_lookup_raises_on_a_corrupt_file(tmp_path):
    path = tmp_path / "nvidia-h200.json"
    path.write_text('{"format": "dsagen-autotune-db",\n "version": 1\n')
    with pytest.raises(db.TuningDBError, match=rf"^{re.escape(str(path))}:3: invalid JSON"):
        _lookup([tmp_path])


def test_running_versions_and_stale_fields():
    running = db.running_versions()
    assert set(running) == {"dsagen", "torch", "triton", "cuda"} and running["dsagen"] == dsagen.__version__
    assert db.stale_fields(make_entry()) == []
    entry = make_entry(versions=dict(running, dsagen="0.0.1", cuda="12.8"))
    assert db.stale_fields(entry, dict(running, cuda="12.9")) == [
        f"dsagen 0.0.1 != {running['dsagen']}", "cuda 12.8 != 12.9"]
    # an absent version (a CPU-only torch has no CUDA) reads "none"
    assert db.stale_fields(make_entry(versions=dict(running, cuda="13.0")), dict(running, cuda=None)) == [
        "cuda 13.0 != none"]


def test_effective_entries_user_over_shipped(tmp_path):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    write_db(user / "nvidia-h200.json", make_entry(S=1024, study="mine"))
    write_db(shipped / "nvidia-h200.json", make_entry(S=1024, study="theirs"), make_entry(S=2048, study="theirs"))
    effective = db.effective_entries("nvidia-h200", [user, shipped])
    assert sorted((e.bucket, e.study) for e in effective.entries.values()) == [
        ("S1024-SKV32768", "mine"), ("S2048-SKV32768", "theirs")]


# ------------------------------------------------------------------------------------------------
# dsagen db


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(db_app, name="db")

    @app.callback()
    def main() -> None:
        """dsagen (test harness)."""

    return app


def invoke(*args):
    return CliRunner().invoke(_app(), ["db", *[str(a) for a in args]], env={"COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture
def two_dirs(tmp_path):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    write_db(user / "nvidia-h200.json", make_entry(S=1024, ms=0.25),
             make_entry(kernel="indexer", schedule={"block_n": 128}, versions=dict(db.running_versions(),
                                                                                   torch="2.11.0")))
    write_db(shipped / "nvidia-h200.json", make_entry(S=1024, ms=0.5), make_entry(S=2048))
    write_db(shipped / "nvidia-h100.json", make_entry(gpu_type="nvidia-h100"))
    return user, shipped


def test_cli_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("list", "show", "merge", "export"):
        assert command in result.output


def listed_table(output: str) -> list[str]:
    """The table of `db list`: its lines before the blank line that ends it."""
    return output.split("\n\n")[0].splitlines()


def listed_files(output: str) -> dict[str, str]:
    """The lines after the table of `db list`: file -> which GPU its entries were tuned on."""
    return dict(line.split(": ", 1) for line in output.split("\n\n")[1].splitlines())


def test_cli_list(two_dirs):
    user, shipped = two_dirs
    result = invoke("list", "--dir", user, "--dir", shipped)
    assert result.exit_code == 0, result.output
    lines = listed_table(result.output)
    assert lines[0].split() == ["FILE", "GPU", "KERNEL", "BUCKET", "SPEC", "MS", "%ROOF", "DATE", "STALE", "SCHEDULE"]
    assert len(lines) == 1 + 5
    assert listed_files(result.output) == {
        str(user / "nvidia-h200.json"): "2 entries tuned on NVIDIA H200 (compute capability 9.0)",
        str(shipped / "nvidia-h200.json"): "2 entries tuned on NVIDIA H200 (compute capability 9.0)",
        str(shipped / "nvidia-h100.json"): "1 entry tuned on NVIDIA H200 (compute capability 9.0)"}
    indexer = next(line for line in lines if " indexer " in line)
    # says why, on the entry's own line: recorded version != running version
    assert f"  stale: torch 2.11.0 != {db.running_versions()['torch']}  " in indexer
    assert indexer.endswith("  block_n=128")
    assert str(user / "nvidia-h200.json") in indexer
    first = next(line for line in lines if "0.25" in line)
    assert first.split()[1:8] == ["nvidia-h200", "sparse_attention", "S1024-SKV32768", HASH[:8], "0.25", "61.5",
                                  "2026-11-28"]
    assert first.endswith("block_h=64 num_warps=4")

    result = invoke("list", "--dir", user, "--dir", shipped, "--gpu", "nvidia-h100")
    assert len(listed_table(result.output)) == 2
    result = invoke("list", "--dir", user, "--dir", shipped, "--kernel", "topk")
    assert result.output.strip() == "no tuned entries"


def test_cli_list_says_which_gpu_each_file_was_tuned_on_and_whom_it_serves(tmp_path):
    """An H100 without a file of its own builds with the H200 file's entries: `db list` says
    where each file's entries were measured, and which GPU types borrow them."""
    write_db(tmp_path / "nvidia-h200.json", make_entry(), make_entry(S=1024),
             make_entry(S=2048, device_name="NVIDIA H200 NVL"))
    write_db(tmp_path / "cpu-x86-64.json", make_entry(gpu_type="cpu-x86-64", compute_capability="cpu",
                                                      device_name="cpu (TVM llvm, some CPU)", backend="tvm"))
    result = invoke("list", "--dir", tmp_path)
    assert result.exit_code == 0, result.output
    assert listed_files(result.output) == {
        str(tmp_path / "cpu-x86-64.json"): "1 entry tuned on cpu (TVM llvm, some CPU)",
        str(tmp_path / "nvidia-h200.json"): "2 entries tuned on NVIDIA H200 (compute capability 9.0), 1 entry tuned "
                                            "on NVIDIA H200 NVL (compute capability 9.0); also serves nvidia-h100 "
                                            "(same compute capability, no file of its own)"}
    result = invoke("list", "--dir", tmp_path, "--gpu", "nvidia-h100")
    assert result.exit_code == 0 and result.output == (
        "no tuned entries of nvidia-h100; its builds use the entries tuned on its compute capability in "
        f"{tmp_path / 'nvidia-h200.json'}\n")
    assert invoke("list", "--dir", tmp_path, "--gpu", "nvidia-a100").output == "no tuned entries\n"
    write_db(tmp_path / "nvidia-h100.json", make_entry(gpu_type="nvidia-h100", device_name="NVIDIA H100"))
    listed = invoke("list", "--dir", tmp_path).output
    assert "also serves" not in listed and "1 entry tuned on NVIDIA H100 (compute capability 9.0)" in listed


def test_cli_list_labels_the_user_folder(tmp_path):
    db.record(db.db_path("nvidia-h200"), make_entry())
    result = invoke("list")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].startswith("user ")
    assert json.loads(invoke("show").output)[0]["folder"] == "user"


def test_cli_show(two_dirs):
    user, shipped = two_dirs
    result = invoke("show", "--dir", user, "--dir", shipped, "--bucket", "S1024-SKV32768", "--spec-hash", HASH[:8])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert [(s["file"], s["entry"]["ms"]) for s in shown] == [
        (str(user / "nvidia-h200.json"), 0.25), (str(shipped / "nvidia-h200.json"), 0.5)]
    assert shown[0]["entry"] == make_entry(S=1024, ms=0.25).to_json()
    assert shown[0]["folder"] == "--dir" and shown[0]["stale"] == []
    assert invoke("show", "--dir", user, "--kernel", "topk").output.strip() == "no tuned entries match"
    bad = invoke("show", "--dir", user, "--bucket", "4096x32768")
    assert bad.exit_code == 1 and "S<pow2>-SKV<pow2>" in bad.output


def test_cli_merge(two_dirs, tmp_path):
    user, shipped = two_dirs
    out = tmp_path / "out" / "nvidia-h200.json"
    result = invoke("merge", user / "nvidia-h200.json", shipped / "nvidia-h200.json", "-o", out)
    assert result.exit_code == 0, result.output
    assert "1 added, 0 replaced, 1 kept, 3 entries in total" in result.output
    assert len(db.load(out).entries) == 3
    result = invoke("merge", user / "nvidia-h200.json", shipped / "nvidia-h100.json")
    assert result.exit_code == 1 and result.output.startswith("error: cannot merge")


def test_cli_export(two_dirs, tmp_path):
    user, shipped = two_dirs
    result = invoke("export", "--gpu", "nvidia-h200", "--dir", user, "--dir", shipped)
    assert result.exit_code == 0, result.output
    exported = tmp_path / "exported" / "nvidia-h200.json"
    exported.parent.mkdir()
    exported.write_text(result.stdout)
    entries = db.load(exported).entries
    assert sorted((e.kernel, e.bucket, e.ms) for e in entries.values()) == [
        ("indexer", "S4096-SKV32768", 1.5), ("sparse_attention", "S1024-SKV32768", 0.25),
        ("sparse_attention", "S2048-SKV32768", 1.5)]
    assert db.dump(db.load(exported)) == result.stdout

    target = tmp_path / "repo" / "autotune_db" / "nvidia-h200.json"
    result = invoke("export", "--gpu", "nvidia-h200", "--dir", user, "--dir", shipped, "-o", target)
    assert result.exit_code == 0, result.output
    assert target.read_text() == exported.read_text()
    result = invoke("export", "--gpu", "nvidia-h200", "--dir", user, "-o", tmp_path / "tuned.json")
    assert result.exit_code == 1 and "must be written to a file named nvidia-h200.json" in result.output


def test_cli_corrupt_file_is_one_error_line(two_dirs):
    user, shipped = two_dirs
    path = user / "nvidia-h200.json"
    text = path.read_text()
    assert text.splitlines()[2].startswith('  {"kernel": "indexer"')
    path.write_text(text.replace('"kernel": "indexer"', '"kernel": "Indexer"'))
    for args in (["list", "--dir", user], ["show", "--dir", user], ["export", "--gpu", "nvidia-h200", "--dir", user],
                 ["merge", shipped / "nvidia-h200.json", path]):
        result = invoke(*args)
        assert result.exit_code == 1, args
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
        assert result.output.startswith(f"error: {path}:3: entry field 'kernel' must be a kernel name"), result.output


# ------------------------------------------------------------------------------------------------
# kernel names are checked by form: a kernel this install does not know loads, and never matches


def test_a_well_formed_unknown_kernel_loads_and_never_answers_a_lookup(tmp_path):
    plugin = make_entry(kernel="flash_sparse_attention", schedule={"tile": 64})
    path = write_db(tmp_path / "nvidia-h200.json", plugin, make_entry(S=1024))
    assert plugin.key in db.load(path).entries
    found = _lookup([tmp_path])
    assert (found.entry.kernel, found.entry.bucket) == ("sparse_attention", "S1024-SKV32768")
    assert db.lookup(kernel="topk", backend="triton", spec_hash=HASH, S=4096, SKV=32768, gpu_type="nvidia-h200",
                     compute_capability="9.0", dirs=[tmp_path]) is None
    assert db.record(path, make_entry(kernel="my_op2", S=2048)) == "added"
    assert len(db.load(path).entries) == 3


@pytest.mark.parametrize("name", ["Flash", "2d_attention", "_private", "flash-attn", "../x", "", 7],
                         ids=["upper", "digit-first", "underscore-first", "dash", "path", "empty", "int"])
def test_kernel_name_must_have_the_form(name):
    with pytest.raises(db.TuningDBError, match="^here: entry field 'kernel' must be a kernel name"):
        db.Entry.from_json(dict(make_entry().to_json(), kernel=name), "here")


# ------------------------------------------------------------------------------------------------
# entries passed over are warned about, once per entry and process


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dsagen" and r.levelno == logging.WARNING]


def _line_of(path: Path, bucket: str, where: str = "") -> int:
    """The line (1-based) of the entry of a bucket (and holding `where`) in a file."""
    return next(i + 1 for i, line in enumerate(path.read_text().splitlines())
                if f'"bucket": "{bucket}"' in line and where in line)


def test_lookup_warns_once_about_an_empty_schedule_and_passes_it_over(tmp_path, caplog):
    path = write_db(tmp_path / "nvidia-h200.json", make_entry(schedule={}), make_entry(S=1024))
    caplog.set_level(logging.WARNING, logger="dsagen")
    for _ in range(3):
        assert _lookup([tmp_path]).entry.bucket == "S1024-SKV32768"  # the nearest usable bucket answers
    line = _line_of(path, "S4096-SKV32768")
    assert _warnings(caplog) == [f"dsagen: {path}:{line}: skipped the tuned entry of sparse_attention "
                                 f"(triton, S4096-SKV32768, spec {HASH}): its schedule is empty"]


def test_lookup_warns_once_when_usable_rejects_an_entry(tmp_path, caplog):
    """`usable` is the caller's check (a build: the schedule names exactly today's knobs)."""
    path = write_db(tmp_path / "nvidia-h200.json", make_entry(schedule={"block_h": 64}),  # from an older space
                    make_entry(S=1024), make_entry(kernel="topk", schedule={"old_knob": 1}))
    caplog.set_level(logging.WARNING, logger="dsagen")
    calls = []

    def usable(entry: db.Entry) -> bool:
        calls.append(entry.key)
        return set(entry.schedule) == {"block_h", "num_warps"}

    for _ in range(2):
        found = db.lookup(kernel="sparse_attention", backend="triton", spec_hash=HASH, S=4096, SKV=32768,
                          gpu_type="nvidia-h200", compute_capability="9.0", dirs=[tmp_path], usable=usable)
        assert found.entry.bucket == "S1024-SKV32768"
    assert all(key[0] == "sparse_attention" for key in calls)  # only entries of the kernel asked for
    line = _line_of(path, "S4096-SKV32768", "sparse_attention")
    assert _warnings(caplog) == [
        f"dsagen: {path}:{line}: skipped the tuned entry of sparse_attention (triton, S4096-SKV32768, spec {HASH}): "
        "its schedule block_h=64 does not fit today's search space (unknown or missing knobs); "
        "`dsagen db prune FILE` removes such entries"]


def test_a_shadowed_entry_is_not_judged_or_warned_about(tmp_path, caplog):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    write_db(user / "nvidia-h200.json", make_entry())
    write_db(shipped / "nvidia-h200.json", make_entry(schedule={}))
    caplog.set_level(logging.WARNING, logger="dsagen")
    assert _lookup([user, shipped]).path == user / "nvidia-h200.json"
    assert _warnings(caplog) == []


def test_an_unusable_user_entry_lets_the_shipped_one_answer(tmp_path, caplog):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    write_db(user / "nvidia-h200.json", make_entry(schedule={"block_h": 64}))
    write_db(shipped / "nvidia-h200.json", make_entry())
    caplog.set_level(logging.WARNING, logger="dsagen")
    found = db.lookup(kernel="sparse_attention", backend="triton", spec_hash=HASH, S=4096, SKV=32768,
                      gpu_type="nvidia-h200", compute_capability="9.0", dirs=[user, shipped],
                      usable=lambda e: len(e.schedule) == 2)
    assert found.path == shipped / "nvidia-h200.json"
    [warning] = _warnings(caplog)
    assert warning.startswith(f"dsagen: {user / 'nvidia-h200.json'}:3: skipped the tuned entry of sparse_attention")


def test_effective_entries_and_export_leave_out_empty_schedules_with_a_warning(tmp_path, caplog):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    path = write_db(user / "nvidia-h200.json", make_entry(S=1024, schedule={}), make_entry(S=2048, schedule={}))
    write_db(shipped / "nvidia-h200.json", make_entry(S=1024, study="theirs"))
    caplog.set_level(logging.WARNING, logger="dsagen")
    effective = db.effective_entries("nvidia-h200", [user, shipped])
    assert [(e.bucket, e.study) for e in effective.entries.values()] == [("S1024-SKV32768", "theirs")]
    assert _warnings(caplog) == [
        f"dsagen: {path}:{_line_of(path, b)}: skipped the tuned entry of sparse_attention (triton, {b}, spec {HASH}): "
        "its schedule is empty" for b in ("S1024-SKV32768", "S2048-SKV32768")]
    listed = invoke("list", "--dir", user).output
    assert listed.count("(empty: skipped by builds)") == 2


def test_prune_drops_empty_schedules_and_keeps_kernels_it_cannot_judge(tmp_path):
    current = make_entry(S=1024, kernel="topk", schedule={})
    plugin = make_entry(kernel="flash_sparse_attention", schedule={"tile": 64})
    path = write_db(tmp_path / "nvidia-h200.json", current, plugin)
    result = invoke("prune", path)
    assert result.exit_code == 0, result.output
    assert "kept flash_sparse_attention triton S4096-SKV32768: no search space here" in result.output
    assert "1 entries dropped" in result.output
    assert list(db.load(path).entries) == [plugin.key]


# ------------------------------------------------------------------------------------------------
# writes follow symbolic links and keep the file's mode


def _linked_db(tmp_path: Path, mode: int = 0o600) -> tuple[Path, Path]:
    """A database reached through a symbolic link (say, into a shared checkout), mode `mode`."""
    real = write_db(tmp_path / "real" / "nvidia-h200.json", make_entry(S=1024, ms=1.0))
    real.chmod(mode)
    link = tmp_path / "links" / "nvidia-h200.json"
    link.parent.mkdir()
    link.symlink_to(real)
    return link, real


def _still_linked(link: Path, real: Path, mode: int = 0o600) -> None:
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert stat.S_IMODE(real.stat().st_mode) == mode
    assert [p.name for p in link.parent.iterdir()] == ["nvidia-h200.json"]  # no temp file or lock beside the link
    assert sorted(p.name for p in real.parent.iterdir()) == [".nvidia-h200.json.lock", "nvidia-h200.json"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444], ids=["0600", "0640", "read-only"])
def test_record_through_a_symlink_keeps_the_link_and_the_mode(tmp_path, mode):
    link, real = _linked_db(tmp_path, mode)
    assert db.record(link, make_entry(S=2048)) == "added"
    _still_linked(link, real, mode)
    assert len(db.load(real).entries) == 2


def test_merge_through_symlinks_keeps_the_links_and_the_mode(tmp_path):
    link, real = _linked_db(tmp_path)
    b = write_db(tmp_path / "b" / "nvidia-h200.json", make_entry(S=1024, ms=0.5), make_entry(S=2048))
    assert db.merge(link, b) == {"added": 1, "replaced": 1, "kept": 0, "total": 2}
    _still_linked(link, real)
    assert {e.bucket: e.ms for e in db.load(real).entries.values()} == {"S1024-SKV32768": 0.5, "S2048-SKV32768": 1.5}
    # and as the -o target of the CLI
    out_real = write_db(tmp_path / "out-real" / "nvidia-h200.json")
    out_real.chmod(0o600)
    out = tmp_path / "out" / "nvidia-h200.json"
    out.parent.mkdir()
    out.symlink_to(out_real)
    result = invoke("merge", b, real, "-o", out)
    assert result.exit_code == 0, result.output
    _still_linked(out, out_real)
    assert len(db.load(out_real).entries) == 2


def test_prune_through_a_symlink_keeps_the_link_and_the_mode(tmp_path):
    link, real = _linked_db(tmp_path)
    db.record(link, make_entry(S=2048, schedule={"block_h": 16}))
    assert [e.bucket for e in db.prune(link, lambda e: e.schedule.get("block_h") != 16)] == ["S2048-SKV32768"]
    _still_linked(link, real)
    assert [e.bucket for e in db.load(real).entries.values()] == ["S1024-SKV32768"]


def test_export_to_a_symlink_keeps_the_link_and_the_mode(two_dirs, tmp_path):
    user, shipped = two_dirs
    link, real = _linked_db(tmp_path)
    result = invoke("export", "--gpu", "nvidia-h200", "--dir", user, "--dir", shipped, "-o", link)
    assert result.exit_code == 0, result.output
    _still_linked(link, real)
    assert len(db.load(real).entries) == 3


def test_a_dangling_symlink_is_written_through(tmp_path):
    real = tmp_path / "real" / "nvidia-h200.json"
    real.parent.mkdir()
    link = tmp_path / "nvidia-h200.json"
    link.symlink_to(real)
    assert db.record(link, make_entry()) == "added"
    assert link.is_symlink() and len(db.load(real).entries) == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_file_gets_the_umask_default(tmp_path, umask, mode):
    path = tmp_path / "nvidia-h200.json"
    old = os.umask(umask)
    try:
        db.record(path, make_entry())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


# ------------------------------------------------------------------------------------------------
# an unusable cache folder is one error that points at DSAGEN_CACHE_DIR


@pytest.fixture
def blocked_cache(tmp_path, monkeypatch) -> Path:
    """DSAGEN_CACHE_DIR below a regular file: the folder can never be created (also as root)."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    cache = blocker / "cache"
    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(cache))
    return cache


def _assert_cache_error(info, cache: Path) -> None:
    assert isinstance(info.value, DsagenError) and isinstance(info.value, OSError)
    message = str(info.value)
    assert message.startswith(f"cannot write to the dsagen cache folder {cache} (")
    assert message.endswith(f"DSAGEN_CACHE_DIR={cache} is not usable: set DSAGEN_CACHE_DIR to a writable folder")


def test_an_unusable_cache_folder_names_it_and_dsagen_cache_dir(blocked_cache):
    def lock():
        with file_lock(blocked_cache / "triton" / ".module.lock"):
            pass

    for action in (lambda: db.record(db.db_path("nvidia-h200"), make_entry()), lock,
                   lambda: atomic_write_text(blocked_cache / "triton" / "module.py", "x = 1\n"),
                   lambda: make_dirs(blocked_cache / "tuning" / "logs")):
        with pytest.raises(CacheDirError) as info:
            action()
        _assert_cache_error(info, blocked_cache)


def test_an_unusable_cache_folder_is_one_cli_error_line(blocked_cache, two_dirs):
    user, _ = two_dirs
    result = invoke("export", "--gpu", "nvidia-h200", "--dir", user, "-o", db.db_path("nvidia-h200"))
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: cannot write to the dsagen cache folder {blocked_cache} (")


def test_without_dsagen_cache_dir_the_hint_still_names_it(tmp_path, monkeypatch):
    monkeypatch.delenv("DSAGEN_CACHE_DIR")
    blocker = tmp_path / "xdg"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(CacheDirError) as info:
        db.record(db.db_path("nvidia-h200"), make_entry())
    assert str(info.value).startswith(f"cannot write to the dsagen cache folder {blocker / 'dsagen'} (")
    assert str(info.value).endswith("; set DSAGEN_CACHE_DIR to a writable folder")


def test_a_read_only_empty_cache_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes into read-only folders: refuse as the kernel would for a user
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self.parent == cache and not self.exists():
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    try:
        with pytest.raises(CacheDirError) as info:
            db.record(db.db_path("nvidia-h200"), make_entry())
        _assert_cache_error(info, cache)
    finally:
        cache.chmod(0o755)


def test_lookups_only_read_so_an_unusable_cache_is_no_error_for_them(blocked_cache):
    assert _lookup(None, spec_hash=OTHER_HASH) is None


def test_paths_outside_the_cache_keep_their_plain_os_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError) as info:
        db.record(blocker / "nvidia-h200.json", make_entry())
    assert not isinstance(info.value, CacheDirError)


# ------------------------------------------------------------------------------------------------
# JSON nested too deeply is one error naming the file


@pytest.mark.parametrize("text", ["[" * 100000, '{"format": "dsagen-autotune-db", "version": 1, "entries": [' + "[" * 100000,
                                  '{"format": "dsagen-autotune-db", "version": 1, "gpu_type": "nvidia-h200", "entries": ['
                                  + "[" * 5000 + "]" * 5000 + "]}"],
                         ids=["open-arrays", "inside-entries", "closed-arrays"])
def test_deeply_nested_json_is_one_error_naming_the_file(tmp_path, text):
    path = tmp_path / "nvidia-h200.json"
    path.write_text(text)
    message = error_of(path)
    assert "\n" not in message and message.endswith(f"; {UNREADABLE_HINT}")
    if message.startswith(f"{path}:1: an entry must be a JSON object"):
        # a parser whose C recursion limit lets it read 5000 closed levels (Python 3.13, and 3.12
        # from some patch release on): the entry check refuses the file instead, also in one line
        assert text.count("[") == 5001
        match = "an entry must be a JSON object"
    else:
        assert message.startswith(f"{path}: invalid JSON: nested too deeply (a tuning database holds flat "
                                  "entries, one per line)")
        match = "nested too deeply"
    with pytest.raises(db.TuningDBError, match=match):
        db.record(path, make_entry())
    assert path.read_text() == text  # never written over
    result = invoke("list", "--dir", tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output == f"error: {message}\n"  # the same one line, whichever check refused the file


# ------------------------------------------------------------------------------------------------
# a corrupt file stops only the lookups that need it, and is never written over


def test_a_corrupt_file_of_another_gpu_type_blocks_no_lookup(tmp_path, caplog):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    write_db(shipped / "nvidia-h100.json", make_entry(gpu_type="nvidia-h100", ms=0.7))
    cpu = user / "cpu-x86-64.json"  # a CPU type's entries never answer a GPU: the file is not even read
    user.mkdir()
    cpu.write_text('{"format": "dsagen-autotune-db",\n "version": oops\n')
    h20 = user / "nvidia-h20.json"  # a GPU type dsagen does not know may hold 9.0 entries: read, passed over
    h20.write_text("[]\n")
    before = {p: p.read_bytes() for p in (cpu, h20)}
    caplog.set_level(logging.WARNING, logger="dsagen")
    for _ in range(2):
        found = _lookup([user, shipped], gpu_type="nvidia-h200")
        assert found.source == "tuned on nvidia-h100 (same compute capability 9.0, bucket S4096-SKV32768)"
    assert _lookup([user, shipped], gpu_type="nvidia-a100", compute_capability="8.0") is None
    [warning] = _warnings(caplog)  # once per file and process
    assert warning.startswith(f"dsagen: skipped the tuning database of another GPU type: {h20}:1: the top level")
    assert all(p.read_bytes() == text for p, text in before.items())


def test_a_corrupt_file_of_the_asking_type_is_an_error_that_says_how_to_recover(tmp_path):
    cpu = tmp_path / "cpu-x86-64.json"
    text = '{"format": "dsagen-autotune-db",\n "version": oops\n'
    cpu.write_text(text)
    write_db(tmp_path / "nvidia-h200.json", make_entry())
    assert _lookup([tmp_path]).source == "tuned (exact bucket S4096-SKV32768)"  # another type's build is fine
    with pytest.raises(db.TuningDBError) as info:
        _lookup([tmp_path], gpu_type="cpu-x86-64", compute_capability="cpu")
    assert str(info.value).startswith(f"{cpu}:2: invalid JSON")
    assert str(info.value).endswith("fix it, or move it aside (the next tuning run then starts a new one)")
    with pytest.raises(db.TuningDBError, match="move it aside"):
        db.record(cpu, make_entry(gpu_type="cpu-x86-64", compute_capability="cpu"))
    assert cpu.read_text() == text


# ------------------------------------------------------------------------------------------------
# read-only databases: a dry run only reads, a write is one error naming the file


@pytest.fixture
def read_only(monkeypatch):
    """chmod a-w for the given paths; as root (who may write anyway) os.access is made to answer
    as it would for a user, from the permission bits."""
    real_access = os.access

    def access(path, mode, **kwargs):
        if mode & os.W_OK and not os.stat(path).st_mode & stat.S_IWUSR:
            return False
        return real_access(path, mode, **kwargs)

    if os.geteuid() == 0:
        monkeypatch.setattr(os, "access", access)
    changed = []

    def make(*paths: Path) -> None:
        for path in paths:
            path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o222)
            changed.append(path)

    yield make
    for path in changed:
        path.chmod(stat.S_IMODE(path.stat().st_mode) | 0o200)


def test_prune_dry_run_writes_nothing_not_even_a_lock(tmp_path, read_only):
    folder = tmp_path / "shipped"
    path = write_db(folder / "nvidia-h200.json", make_entry(schedule={}), make_entry(S=1024))
    text = path.read_bytes()
    read_only(path, folder)
    result = invoke("prune", path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would drop sparse_attention triton S4096-SKV32768 {}" in result.output
    assert "2 entries would be dropped" in result.output  # block_h=64 num_warps=4 no longer names every knob
    assert sorted(p.name for p in folder.iterdir()) == ["nvidia-h200.json"] and path.read_bytes() == text
    result = invoke("prune", path)
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"error: {path}: the file is read-only")
    assert path.read_bytes() == text


def test_merge_into_a_read_only_database_is_one_error_naming_it(two_dirs, tmp_path, read_only):
    user, shipped = two_dirs
    a, b = user / "nvidia-h200.json", shipped / "nvidia-h200.json"
    text = a.read_bytes()
    read_only(a)
    result = invoke("merge", a, b)
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"error: {a}: the file is read-only: make it writable, or write the result "
                                    "to another file")
    assert a.read_bytes() == text
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    result = invoke("merge", a, b, "-o", locked / "nvidia-h200.json")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"error: {locked / 'nvidia-h200.json'}: cannot write in its folder {locked}")
    assert list(locked.iterdir()) == []  # no lock file either
    assert "Errno" not in result.output


# ------------------------------------------------------------------------------------------------
# --dir must be a folder; a CPU entry has no roofline


@pytest.mark.parametrize("command", ["list", "show"])
def test_dir_that_is_not_a_folder_is_one_error_naming_dir(two_dirs, tmp_path, command):
    user, _ = two_dirs
    for bad, what in ((user / "nvidia-h200.json", "is a file"), (tmp_path / "absent", "does not exist")):
        result = invoke(command, "--dir", user, "--dir", bad)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert result.output.startswith(f"error: --dir {bad}: {what}; give a folder of <gpu-type>.json"), result.output


def test_list_leaves_the_roofline_of_a_cpu_entry_empty(tmp_path):
    write_db(tmp_path / "cpu-x86-64.json", make_entry(gpu_type="cpu-x86-64", compute_capability="cpu",
                                                      device_name="cpu (TVM llvm, some CPU)", backend="tvm",
                                                      pct_of_roofline=0.0, ms=12.5))
    write_db(tmp_path / "nvidia-h200.json", make_entry())
    result = invoke("list", "--dir", tmp_path)
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line.split() for line in listed_table(result.output)[1:]}
    assert rows["cpu-x86-64"][5:7] == ["12.5", "-"]
    assert rows["nvidia-h200"][5:7] == ["1.5", "61.5"]
