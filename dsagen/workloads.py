"""The problem each kernel is tuned and benchmarked on: inputs, a checked run, naive PyTorch, cost.

One recipe per kernel, shared by `dsagen tune` and `dsagen bench` (and the H200 targets file):
the S queries are the last S positions of a causal context of SKV keys (top-k: whole rows). Each run writes into
outputs poisoned with NaN / -7 so an element the kernel forgot fails the check, and the check is
the float64 reference on a sample of rows (first, last and random ones) of the very inputs timed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from .plan import causal_window_mean, cost
from .spec import ALL_KERNELS, Spec
from .verify import TOLERANCES, assert_close, assert_topk

_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "bf16": torch.bfloat16}


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def causal_windows(S: int, SKV: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ks = 0, ke[t] = SKV - S + t + 1: query t sees itself and everything before it."""
    ks = torch.zeros(S, dtype=torch.int32, device=device)
    ke = torch.arange(SKV - S + 1, SKV + 1, dtype=torch.int32, device=device)
    return ks, ke


# ------------------------------------------------------------------------------------------------
# inputs (positional arguments of the kernel, in its launcher's order)

def indexer_inputs(spec: Spec, S: int, SKV: int, device="cuda", seed: int = 0):
    """q, k in the spec's dtype (scaled so fp8 uses its range), k_scale, weights, causal windows."""
    ix = spec.indexer
    g = _generator(device, seed)
    q = (torch.randn(S, ix.heads, ix.head_dim, device=device, generator=g) * 4).to(_DTYPES[ix.dtype])
    k = (torch.randn(SKV, ix.head_dim, device=device, generator=g) * 4).to(_DTYPES[ix.dtype])
    k_scale = torch.rand(SKV, device=device, generator=g) + 0.5
    w = torch.randn(S, ix.heads, device=device, generator=g) / ix.heads
    return (q, k, k_scale, w, *causal_windows(S, SKV, device))


def topk_inputs(spec: Spec, S: int, SKV: int, device="cuda", seed: int = 0):
    """fp32 logits shaped like the indexer's output, every row's window the whole row (as in the
    H200 targets file, so that torch.topk is the fair naive baseline)."""
    x = torch.randn(S, SKV, device=device, generator=_generator(device, seed))
    ks = torch.zeros(S, dtype=torch.int32, device=device)
    ke = torch.full((S,), SKV, dtype=torch.int32, device=device)
    return (x, ks, ke)


def sparse_attention_inputs(spec: Spec, S: int, SKV: int, device="cuda", seed: int = 0):
    """q, kv and, per query, k random distinct causal keys padded with the invalid index SKV."""
    at, k = spec.attention, spec.topk.k
    g = _generator(device, seed)
    q = torch.randn(S, at.heads, at.qk_dim, device=device, generator=g).bfloat16()
    kv = torch.randn(SKV, at.qk_dim, device=device, generator=g).bfloat16()
    pos = torch.arange(SKV - S, SKV, device=device)
    keys = torch.rand(S, SKV, device=device, generator=g)
    keys = keys.masked_fill(torch.arange(SKV, device=device)[None, :] > pos[:, None], -1.0)
    vals, idx = keys.topk(min(k, SKV), dim=1)
    idx = torch.where(vals >= 0, idx, SKV).int()
    if k > SKV:
        idx = torch.cat([idx, torch.full((S, k - SKV), SKV, dtype=torch.int32, device=device)], 1)
    return (q, kv, idx.contiguous(), at.softmax_scale)


# ------------------------------------------------------------------------------------------------
# poisoned outputs

def poisoned_outputs(spec: Spec, kernel: str, inputs) -> dict[str, torch.Tensor]:
    """Output buffers (keyword arguments of the launcher) filled with values no kernel writes."""
    if kernel == "indexer":
        q, k = inputs[0], inputs[1]
        return {"out": torch.full((q.shape[0], k.shape[0]), math.nan, device=q.device)}
    if kernel in ("topk", "indexer_topk"):
        x = inputs[0]
        return {"out": torch.full((x.shape[0], spec.topk.k), -7, dtype=torch.int32, device=x.device)}
    q = inputs[0]
    at = spec.attention
    return {"out": torch.full((q.shape[0], at.heads, at.v_dim), math.nan, dtype=q.dtype, device=q.device),
            "lse": torch.full((q.shape[0], at.heads), math.nan, device=q.device)}


# ------------------------------------------------------------------------------------------------
# checks against the float64 reference on sampled rows

def sample_rows(S: int, n: int, seed: int) -> torch.Tensor:
    """First, last and n-2 random rows (sorted, distinct)."""
    g = torch.Generator().manual_seed(seed)
    rows = {0, S - 1} | set(torch.randint(0, S, (max(n - 2, 0),), generator=g).tolist())
    return torch.tensor(sorted(rows))


def check(spec: Spec, kernel: str, inputs, result, rows: torch.Tensor) -> str:
    """Raise verify.Mismatch if `result` is wrong on `rows`; else say what was checked."""
    dev_rows = rows.to(inputs[0].device)
    if kernel == "indexer":
        q, k, k_scale, w, ks, ke = inputs
        ref = reference.indexer(q[dev_rows], k, k_scale, w[dev_rows], ks[dev_rows], ke[dev_rows])
        ratio = assert_close(f"indexer.logits.{spec.indexer.dtype}", result[dev_rows], ref)
        return f"float64 reference on {len(rows)} rows, RMS ratio {ratio:.2e}"
    if kernel == "topk":
        x, ks, ke = inputs
        assert_topk(result[dev_rows], x[dev_rows], ks[dev_rows], ke[dev_rows], spec.topk.k)
        return f"exact top-k contract on {len(rows)} rows"
    if kernel == "indexer_topk":  # its logits are never stored: select-check against the reference's
        q, k, k_scale, w, ks, ke = inputs
        ref = reference.indexer(q[dev_rows], k, k_scale, w[dev_rows], ks[dev_rows], ke[dev_rows])
        tol = TOLERANCES[f"indexer.logits.{spec.indexer.dtype}"]
        assert_topk(result[dev_rows], ref, ks[dev_rows], ke[dev_rows], spec.topk.k, tolerance=tol)
        return f"top-k contract against float64 logits on {len(rows)} rows (tolerance {tol:g})"
    q, kv, idx, sm_scale = inputs
    out, lse = result
    ref_out, ref_lse = reference.sparse_attention(q[dev_rows], kv, idx[dev_rows], sm_scale, spec.attention.v_dim)
    r1 = assert_close("sparse_attention.out", out[dev_rows], ref_out)
    r2 = assert_close("sparse_attention.lse", lse[dev_rows], ref_lse)
    return f"float64 reference on {len(rows)} rows, RMS ratio out {r1:.2e}, lse {r2:.2e}"


# ------------------------------------------------------------------------------------------------
# naive PyTorch: the baseline every speed-up is measured against

def naive_sparse_attention(q, kv, idx, sm_scale: float, v_dim: int, chunk: int = 256):  # noqa: D103
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


def naive_topk(x, ks, ke, k: int):
    """torch.topk over whole rows (the recipe's windows are whole rows)."""
    return torch.topk(x, min(k, x.shape[1]), dim=1)


@dataclass(frozen=True)
class Workload:
    kernel: str
    make_inputs: Callable  # (spec, S, SKV, device, seed) -> tuple of launcher arguments
    naive_name: str

    def naive(self, spec: Spec, inputs) -> Callable[[], object]:
        """A zero-argument callable running naive PyTorch on `inputs`."""
        if self.kernel == "indexer":
            return lambda: naive_indexer(*inputs)
        if self.kernel == "topk":
            return lambda: naive_topk(*inputs, spec.topk.k)
        if self.kernel == "indexer_topk":
            return lambda: naive_topk(naive_indexer(*inputs), inputs[4], inputs[5], spec.topk.k)
        at = spec.attention
        return lambda: naive_sparse_attention(*inputs, at.v_dim)

    def sizes(self, S: int, SKV: int) -> dict[str, float]:
        """The cost model's symbols at this shape (mean causal window for the indexer)."""
        return {"S": S, "SKV": SKV, "W": causal_window_mean(S, SKV)}

    def rates(self, spec: Spec, S: int, SKV: int, ms: float, gpu) -> dict[str, float | None]:
        """TFLOP/s, GB/s and % of the roofline floor at `ms`."""
        c = cost(spec, self.kernel)
        sizes = self.sizes(S, SKV)
        flops, nbytes = c.evaluate(sizes)
        floor, _ = c.floor_ms(sizes, gpu)
        return {"tflops": flops / ms / 1e9 if flops else None, "gbps": nbytes / ms / 1e6,
                "floor_ms": floor, "pct_of_roofline": 100.0 * floor / ms}


WORKLOADS: dict[str, Workload] = {
    "indexer": Workload("indexer", indexer_inputs, "bf16 einsum + relu + weights (chunks of 256)"),
    "topk": Workload("topk", topk_inputs, "torch.topk"),
    "indexer_topk": Workload("indexer_topk", indexer_inputs, "bf16 einsum indexer, then torch.topk"),
    "sparse_attention": Workload("sparse_attention", sparse_attention_inputs,
                                 "gather + einsum + softmax (bf16, chunks of 256)"),
}
assert set(WORKLOADS) == set(ALL_KERNELS)


def validate_shape(S: int, SKV: int) -> None:
    """The recipes put the S queries at the end of the SKV context."""
    if S < 1 or SKV < 1:
        raise ValueError(f"shape S={S}, SKV={SKV}: both must be >= 1")
    if S > SKV:
        raise ValueError(f"shape S={S}, SKV={SKV}: the queries are the last S of SKV tokens, so S <= SKV")
