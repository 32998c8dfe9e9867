"""The deterministic, batch-invariant build: one schedule per kernel whatever the batch, and a decode
step whose rows are bitwise the same on every rerun and in every batch they are part of."""
from __future__ import annotations

import pytest

import dsagen
from dsagen import db
from dsagen.db.buckets import bucket_of

SERVING = "specs/deepseek_v32_serving.toml"
CANONICAL = {"block_h": 64, "block_n": 64, "k_split": 1, "prefetch": 0, "num_warps": 8, "num_stages": 2}
SMALL_BATCH = {"block_h": 64, "block_n": 32, "k_split": 4, "prefetch": 1, "num_warps": 8, "num_stages": 1}


@pytest.fixture
def user_db(tmp_path, monkeypatch):
    """A private user tuning database holding two sparse_decode winners of the serving spec: one at
    the canonical decode bucket and another, different one for small batches."""
    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(tmp_path / "cache"))
    spec = dsagen.load_spec(SERVING)
    path = db.db_path("nvidia-h200")

    def entry(S, SKV, schedule):
        return db.Entry(kernel="sparse_decode", backend="triton", spec_hash=spec.semantic_hash("sparse_decode"),
                        bucket=bucket_of(S, SKV), shape={"S": S, "SKV": SKV}, schedule=schedule, ms=1.0,
                        tflops=None, gbps=None, pct_of_roofline=None, gpu_type="nvidia-h200",
                        device_name="NVIDIA H200", compute_capability="9.0", date="2026-11-29",
                        versions=db.running_versions(), trials=4, sampler="grid", study="test")

    for e in (entry(256, 32768, CANONICAL), entry(8, 32768, SMALL_BATCH)):
        db.record(path, e)
    return spec


def test_a_plain_build_follows_the_shape_bucket(user_db):
    kernels = dsagen.build(user_db, gpu="nvidia-h200")
    assert kernels.resolve("sparse_decode", 8, 32768, "cuda").point == SMALL_BATCH
    assert kernels.resolve("sparse_decode", 256, 32768, "cuda").point == CANONICAL


@pytest.mark.parametrize("S,SKV", [(8, 32768), (2, 4096), (1000, 200000), (256, 32768)])
def test_a_deterministic_build_resolves_every_batch_at_the_canonical_shape(user_db, S, SKV):
    kernels = dsagen.build(user_db, gpu="nvidia-h200", deterministic=True)
    hit = kernels.resolve("sparse_decode", S, SKV, "cuda")
    assert hit.point == CANONICAL
    assert hit.bucket == bucket_of(256, 32768)
    # the prefill kernels too: one bucket for every shape
    assert kernels.resolve("indexer", S, SKV, "cuda").bucket == bucket_of(4096, 32768)
