"""Benchmarks: each generated kernel beside naive PyTorch in the same run, checked before timed.

Timing is triton.testing.do_bench's median (CUDA events) after warm-up, on inputs of the shapes in
the H200 targets file (all larger than the 50 MB L2). Every timed kernel is first checked against
the float64 reference on a sample of rows, so a number never comes from a wrong kernel.
"""
from __future__ import annotations

import datetime
import json
import math
import platform
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from . import reference
from .__version__ import __version__
from .gpus import GPU
from .kernels import DSAKernels
from .plan import causal_window_mean, cost
from .verify import assert_close, assert_topk


@dataclass
class BenchRow:
    kernel: str
    shape: dict
    ms: float
    naive_ms: float
    naive: str
    tflops: float | None
    gbps: float
    floor_ms: float
    pct_of_roofline: float
    speedup_vs_naive: float
    schedule: dict
    check: str


def _median_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median"))


# ------------------------------------------------------------------------------------------------
# inputs, following the recipes of the H200 targets file

def sparse_inputs(S: int, SKV: int, H: int, dqk: int, k: int, device="cuda", seed=0):
    """Queries are the last S of SKV; each picks random distinct keys <= its position, padded with
    an invalid index (SKV) when it has fewer than k keys."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(S, H, dqk, device=device, generator=g).bfloat16()
    kv = torch.randn(SKV, dqk, device=device, generator=g).bfloat16()
    pos = torch.arange(SKV - S, SKV, device=device)
    keys = torch.rand(S, SKV, device=device, generator=g)
    keys = keys.masked_fill(torch.arange(SKV, device=device)[None, :] > pos[:, None], -1.0)
    vals, idx = keys.topk(k, dim=1)
    idx = torch.where(vals >= 0, idx, SKV).int()
    return q, kv, idx.contiguous()


def indexer_inputs(S: int, SKV: int, H: int, D: int, dtype: str, device="cuda", seed=0):
    """fp8 (or bf16) q and k quantized on the host side of the kernel, fp32 per-token k scale and
    weights, causal windows ks=0, ke[t] = SKV - S + t + 1."""
    g = torch.Generator(device=device).manual_seed(seed)
    tdt = torch.float8_e4m3fn if dtype == "fp8_e4m3" else torch.bfloat16
    q = (torch.randn(S, H, D, device=device, generator=g) * 4).to(tdt)
    k = (torch.randn(SKV, D, device=device, generator=g) * 4).to(tdt)
    k_scale = torch.rand(SKV, device=device, generator=g) + 0.5
    w = torch.randn(S, H, device=device, generator=g) / H
    ks = torch.zeros(S, dtype=torch.int32, device=device)
    ke = torch.arange(SKV - S + 1, SKV + 1, dtype=torch.int32, device=device)
    return q, k, k_scale, w, ks, ke


# ------------------------------------------------------------------------------------------------
# naive PyTorch, the baseline every speed-up is measured against

def naive_sparse_attention(q, kv, idx, sm_scale: float, v_dim: int, chunk: int = 256):
    """Gather the selected rows and do dense attention over them, in chunks of queries."""
    S, H, _ = q.shape
    out = torch.empty(S, H, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(S, H, dtype=torch.float32, device=q.device)
    for s0 in range(0, S, chunk):
        ix = idx[s0:s0 + chunk].long()
        valid = (ix >= 0) & (ix < kv.shape[0])
        rows = kv[ix.clamp(0, kv.shape[0] - 1)]  # [c, k, D]
        scores = torch.einsum("chd,ckd->chk", q[s0:s0 + chunk], rows).float() * sm_scale
        scores = scores.masked_fill(~valid[:, None, :], -math.inf)
        lse[s0:s0 + chunk] = torch.logsumexp(scores, -1)
        p = torch.softmax(scores, -1).nan_to_num(0.0).to(q.dtype)
        out[s0:s0 + chunk] = torch.einsum("chk,ckd->chd", p, rows[..., :v_dim])
    return out, lse


def naive_indexer(q, k, k_scale, w, ks, ke, chunk: int = 256):
    """bf16 einsum per chunk of queries (torch has no fp8 einsum), relu, weights, scale, mask."""
    S = q.shape[0]
    out = torch.empty(S, k.shape[0], dtype=torch.float32, device=q.device)
    kb = k.to(torch.bfloat16)
    cols = torch.arange(k.shape[0], device=q.device)[None, :]
    for s0 in range(0, S, chunk):
        qb = q[s0:s0 + chunk].to(torch.bfloat16)
        scores = torch.einsum("thd,sd->ths", qb, kb).float().relu_()
        logits = torch.einsum("ths,th->ts", scores, w[s0:s0 + chunk]) * k_scale[None, :]
        inside = (cols >= ks[s0:s0 + chunk, None]) & (cols < ke[s0:s0 + chunk, None])
        out[s0:s0 + chunk] = logits.masked_fill(~inside, -math.inf)
    return out


# ------------------------------------------------------------------------------------------------

def _row(kernel, shape, ms, naive_ms, naive, flops, nbytes, floor_ms, schedule, check) -> BenchRow:
    return BenchRow(kernel, shape, ms, naive_ms, naive, flops / ms / 1e9 if flops else None,
                    nbytes / ms / 1e6, floor_ms, 100.0 * floor_ms / ms, naive_ms / ms, schedule, check)


def bench_sparse_attention(kernels: DSAKernels, gpu: GPU, S: int, SKV: int, sample_rows: int = 4) -> BenchRow:
    spec, at = kernels.spec, kernels.spec.attention
    q, kv, idx = sparse_inputs(S, SKV, at.heads, at.qk_dim, spec.topk.k)
    scale = at.softmax_scale
    out, lse = kernels.sparse_attention(q, kv, idx)
    rows = torch.linspace(0, S - 1, sample_rows).long()
    ref_out, ref_lse = reference.sparse_attention(q[rows].cpu(), kv.cpu(), idx[rows].cpu(), scale, at.v_dim)
    assert_close("sparse_attention.out", out[rows], ref_out)
    assert_close("sparse_attention.lse", lse[rows], ref_lse)
    ms = _median_ms(lambda: kernels.sparse_attention(q, kv, idx))
    naive_ms = _median_ms(lambda: naive_sparse_attention(q, kv, idx, scale, at.v_dim))
    sizes = {"S": S, "SKV": SKV}
    c = cost(spec, "sparse_attention")
    flops, nbytes = c.evaluate(sizes)
    floor, _ = c.floor_ms(sizes, gpu)
    shape = {"S": S, "SKV": SKV, "H": at.heads, "Dqk": at.qk_dim, "Dv": at.v_dim, "topk": spec.topk.k}
    return _row("sparse_attention", shape, ms, naive_ms, "gather + einsum + softmax (bf16, chunks of 256)",
                flops, nbytes, floor, kernels.sources["sparse_attention"].choice.point,
                f"float64 reference on {sample_rows} rows")


def bench_indexer(kernels: DSAKernels, gpu: GPU, S: int, SKV: int, sample_rows: int = 4) -> BenchRow:
    spec, ix = kernels.spec, kernels.spec.indexer
    q, k, k_scale, w, ks, ke = indexer_inputs(S, SKV, ix.heads, ix.head_dim, ix.dtype)
    logits = kernels.indexer(q, k, k_scale, w, ks, ke)
    rows = torch.linspace(0, S - 1, sample_rows).long()
    ref = reference.indexer(q[rows].cpu(), k.cpu(), k_scale.cpu(), w[rows].cpu(), ks[rows].cpu(), ke[rows].cpu())
    assert_close(f"indexer.logits.{ix.dtype}", logits[rows], ref)
    ms = _median_ms(lambda: kernels.indexer(q, k, k_scale, w, ks, ke))
    naive_ms = _median_ms(lambda: naive_indexer(q, k, k_scale, w, ks, ke))
    sizes = {"S": S, "SKV": SKV, "W": causal_window_mean(S, SKV)}
    c = cost(spec, "indexer")
    flops, nbytes = c.evaluate(sizes)
    floor, _ = c.floor_ms(sizes, gpu)
    shape = {"S": S, "SKV": SKV, "H": ix.heads, "D": ix.head_dim, "dtype": ix.dtype, "window": "causal"}
    return _row("indexer", shape, ms, naive_ms, "bf16 einsum + relu + weights (chunks of 256)", flops, nbytes,
                floor, kernels.sources["indexer"].choice.point, f"float64 reference on {sample_rows} rows")


def bench_topk(kernels: DSAKernels, gpu: GPU, S: int, SKV: int, sample_rows: int = 8) -> BenchRow:
    spec, k = kernels.spec, kernels.spec.topk.k
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(S, SKV, device="cuda", generator=g)
    ks = torch.zeros(S, dtype=torch.int32, device="cuda")
    ke = torch.full((S,), SKV, dtype=torch.int32, device="cuda")
    idx = kernels.topk(x, ks, ke)
    rows = torch.linspace(0, S - 1, sample_rows).long()
    assert_topk(idx[rows], x[rows], ks[rows], ke[rows], k)
    ms = _median_ms(lambda: kernels.topk(x, ks, ke))
    naive_ms = _median_ms(lambda: torch.topk(x, k, dim=1))
    sizes = {"S": S, "SKV": SKV}
    c = cost(spec, "topk")
    _, nbytes = c.evaluate(sizes)
    floor, _ = c.floor_ms(sizes, gpu)
    return _row("topk", {"rows": S, "n": SKV, "k": k, "dtype": "fp32", "window": "full row"}, ms, naive_ms,
                "torch.topk", 0.0, nbytes, floor, kernels.sources["topk"].choice.point,
                f"exact top-k contract on {sample_rows} rows")


def environment() -> dict:
    import triton

    return {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "dsagen": __version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def format_table(rows: list[BenchRow]) -> str:
    head = f"{'kernel':<18}{'ms':>9}{'naive ms':>10}{'speed-up':>10}{'TFLOP/s':>9}{'GB/s':>8}{'floor ms':>10}{'% roof':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tf = f"{r.tflops:.0f}" if r.tflops else "-"
        lines.append(f"{r.kernel:<18}{r.ms:>9.3f}{r.naive_ms:>10.3f}{r.speedup_vs_naive:>9.2f}x{tf:>9}"
                     f"{r.gbps:>8.0f}{r.floor_ms:>10.3f}{r.pct_of_roofline:>7.1f}%")
    return "\n".join(lines)


def to_json(rows: list[BenchRow]) -> str:
    return json.dumps({"environment": environment(), "results": [asdict(r) for r in rows]}, indent=1)
