"""The deterministic, batch-invariant build: one schedule per kernel whatever the batch, and a decode
step whose rows are bitwise the same on every rerun and in every batch they are part of."""
from __future__ import annotations

import pytest
import torch

from dsagen.ops import semantic_hash
import dsagen
from dsagen import db
from dsagen.cache_formats import pack_index_pages
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
        return db.Entry(kernel="sparse_decode", backend="triton", spec_hash=semantic_hash(spec, "sparse_decode"),
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


def small_serving_spec():
    return dsagen.Spec(indexer=dsagen.IndexerSpec(heads=3, head_dim=40, dtype="fp8_e4m3"), topk=dsagen.TopKSpec(k=9),
                       attention=dsagen.AttentionSpec(heads=5, qk_dim=576, v_dim=512),
                       cache=dsagen.CacheSpec(page_size=16))


class Universe:
    """Requests whose pages live in two shared caches; a batch is any subset of them, its block
    table as wide as its longest request (the rest of a row is filled with other pages)."""

    def __init__(self, spec, gen, context_lens, next_n, device):
        ix, at, page = spec.indexer, spec.attention, spec.cache.page_size
        self.page, self.next_n, self.device = page, next_n, device
        self.blocks = [-(-n // page) for n in context_lens]
        n_pages = sum(self.blocks) + 4
        perm = torch.randperm(n_pages, generator=gen)
        starts = [sum(self.blocks[:i]) for i in range(len(context_lens))]
        self.pages = [perm[s:s + n] for s, n in zip(starts, self.blocks)]
        self.spare = perm[sum(self.blocks):]
        n_slots = n_pages * page
        keys = (torch.randn(n_slots, ix.head_dim, generator=gen) * 20).clamp(-448, 448).to(torch.float8_e4m3fn)
        scales = torch.exp2(torch.randint(-3, 3, (n_slots,), generator=gen).float())
        # few distinct key values: many tied logits, so the top-k's tie rule matters
        keys = keys[torch.randint(0, 7, (n_slots,), generator=gen)]
        self.index_cache = pack_index_pages(keys, scales, page).to(device)
        self.mla_rows = (torch.randn(n_slots, 576, generator=gen) * 3).bfloat16().to(device)
        self.context_lens = list(context_lens)
        B = len(context_lens)
        self.q = torch.randn(B, next_n, at.heads, 576, generator=gen).bfloat16().to(device)
        self.index_q = (torch.randn(B, next_n, ix.heads, ix.head_dim, generator=gen) * 8).to(torch.float8_e4m3fn)
        self.index_q = self.index_q.to(device)
        self.weights = torch.randn(B * next_n, ix.heads, generator=gen).to(device)

    def batch(self, members, width):
        """The decode() arguments of the requests `members`, with a block table `width` pages wide."""
        table = self.spare[torch.arange(len(members) * width) % len(self.spare)].reshape(len(members), width)
        for i, m in enumerate(members):
            table[i, :self.blocks[m]] = self.pages[m]
        rows = torch.tensor([m * self.next_n + j for m in members for j in range(self.next_n)])
        lens = torch.tensor([self.context_lens[m] for m in members], dtype=torch.int32)
        return (self.q[members], self.index_q[members], self.weights[rows.to(self.device)],
                lens.to(self.device), table.int().to(self.device))


def run_batch(kernels, uni, mla_cache, members, width):
    q, index_q, weights, lens, table = uni.batch(members, width)
    step = kernels.decode(q, mla_cache, index_q, uni.index_cache, weights, lens, table)
    return {"out": step.out, "lse": step.lse, "slots": step.slots}


def test_a_deterministic_decode_step_is_batch_invariant(device, gen):
    """Request 1 alone, then among eight others with a wider block table (other split counts in
    the top-k, other launch grids): its slots, out and lse are bitwise the same, and so is a
    rerun."""
    spec = small_serving_spec()
    # small chunks, so the top-k splits each row into a number of programs that depends on the batch
    kernels = dsagen.build(spec, deterministic=True, schedules={"decode_topk": {"chunk": 64, "block_n": 64}})
    assert kernels.resolve("decode_topk").point["sorted"] == 1  # forced over the override
    uni = Universe(spec, gen, [150, 203, 77, 260, 199, 31, 120, 240, 188], next_n=2, device=device)
    mla_cache = torch.zeros(uni.index_cache.shape[0], 16, 1, 656, dtype=torch.uint8, device=device)
    kernels.mla_cache_write(uni.mla_rows, torch.arange(uni.mla_rows.shape[0], dtype=torch.int32, device=device),
                            mla_cache)
    alone = run_batch(kernels, uni, mla_cache, [1], uni.blocks[1])
    crowd = run_batch(kernels, uni, mla_cache, [4, 0, 2, 1, 3, 5, 6, 7, 8], max(uni.blocks) + 2)
    again = run_batch(kernels, uni, mla_cache, [1], uni.blocks[1])
    for name in ("slots", "out", "lse"):
        assert torch.equal(alone[name][0], crowd[name][3]), name
        assert torch.equal(alone[name], again[name]), name
    # sorted: each row's valid slots follow ascending positions (the table maps pages in order)
    positions = [uni.pages[1].tolist().index(int(s) // 16) * 16 + int(s) % 16
                 for s in alone["slots"][0, 0].tolist() if s >= 0]
    assert positions == sorted(positions) and len(positions) == 9
