"""Stage 1, the lightning indexer: logits[t, s] = k_scale[s] * sum_j w[t, j] * relu(q[t, j] . k[s])
inside each row's key window [ks[t], ke[t]), -inf outside; fp8 e4m3 or bf16 inputs, fp32 out."""
from __future__ import annotations

import math

import torch

from .. import reference
from ..verify import assert_close
from . import register
from .base import (ELEM_BYTES, INDEXER_LOGITS_TOLERANCES, INDEXER_TRAINS_THROUGH_LOSS, SKV, TORCH_DTYPES, Call, Cost,
                   Op, S, W, causal_window_mean, causal_windows, check_out, check_tensor, generator, next_pow2)


def check_indexer_inputs(spec, q, k, k_scale, weights, ks, ke) -> tuple[torch.device, int, int]:
    """The indexer's inputs (shared with the fused indexer + top-k): device, S and SKV."""
    ix = spec.indexer
    dtype = TORCH_DTYPES[ix.dtype]
    check_tensor("q", q, dtype, (None, ix.heads, ix.head_dim))
    dev, n_q = q.device, q.shape[0]
    check_tensor("k", k, dtype, (None, ix.head_dim), dev)
    n_kv = k.shape[0]
    if k_scale is not None:
        check_tensor("k_scale", k_scale, torch.float32, (n_kv,), dev)
    check_tensor("weights", weights, torch.float32, (n_q, ix.heads), dev)
    check_tensor("ks", ks, torch.int32, (n_q,), dev)
    check_tensor("ke", ke, torch.int32, (n_q,), dev)
    return dev, n_q, n_kv


def indexer_inputs(spec, S_: int, SKV_: int, device, seed: int) -> tuple:
    """q, k in the spec's dtype (scaled so fp8 uses its range), k_scale, weights, causal windows:
    the S queries are the last S positions of a causal context of SKV keys."""
    ix = spec.indexer
    g = generator(device, seed)
    q = (torch.randn(S_, ix.heads, ix.head_dim, device=device, generator=g) * 4).to(TORCH_DTYPES[ix.dtype])
    k = (torch.randn(SKV_, ix.head_dim, device=device, generator=g) * 4).to(TORCH_DTYPES[ix.dtype])
    k_scale = torch.rand(SKV_, device=device, generator=g) + 0.5
    w = torch.randn(S_, ix.heads, device=device, generator=g) / ix.heads
    return (q, k, k_scale, w, *causal_windows(S_, SKV_, device))


def naive_indexer(q, k, k_scale, w, ks, ke, chunk: int = 256):
    """bf16 einsum per chunk of queries (torch has no fp8 einsum), relu, weights, scale, mask."""
    n_q = q.shape[0]
    out = torch.empty(n_q, k.shape[0], dtype=torch.float32, device=q.device)
    kb = k.to(torch.bfloat16)
    cols = torch.arange(k.shape[0], device=q.device)[None, :]
    for s0 in range(0, n_q, chunk):
        qb = q[s0:s0 + chunk].to(torch.bfloat16)
        scores = torch.einsum("thd,sd->ths", qb, kb).float().relu_()
        logits = torch.einsum("ths,th->ts", scores, w[s0:s0 + chunk])
        if k_scale is not None:
            logits = logits * k_scale[None, :]
        inside = (cols >= ks[s0:s0 + chunk, None]) & (cols < ke[s0:s0 + chunk, None])
        out[s0:s0 + chunk] = logits.masked_fill(~inside, -math.inf)
    return out


def indexer_cost(spec, output_bytes) -> Cost:
    """Useful FLOPs (the mean window W per row) and the inputs read once, plus `output_bytes`."""
    ix = spec.indexer
    eb = ELEM_BYTES[ix.dtype]
    nbytes = (S * ix.heads * ix.head_dim * eb  # q
              + SKV * ix.head_dim * eb + SKV * 4  # k, k_scale
              + S * ix.heads * 4 + S * 8  # weights, ks/ke
              + output_bytes)
    return Cost("", 2 * S * W * ix.heads * ix.head_dim, nbytes, "fp8" if ix.dtype == "fp8_e4m3" else "bf16")


def indexer_symbols(spec) -> dict[str, int]:
    ix = spec.indexer
    return {"heads": ix.heads, "heads_pad": next_pow2(ix.heads), "d_pad": next_pow2(ix.head_dim, 32),
            "elem_bytes": ELEM_BYTES[ix.dtype]}


class IndexerOp(Op):
    name = "indexer"
    position = 10
    summary = "lightning indexer: fp32 logits [S, SKV] of each query over its key window"
    backends = ("triton", "tvm")
    stage = True
    short_names = {"block_m": "m", "block_h": "hb", "block_n": "n", "num_warps": "w", "num_stages": "s"}
    naive_name = "bf16 einsum + relu + weights (chunks of 256)"
    no_backward_hint = INDEXER_TRAINS_THROUGH_LOSS
    args = (("q", "Tensor"), ("k", "Tensor"), ("k_scale", "Tensor?"), ("weights", "Tensor"), ("ks", "Tensor"),
            ("ke", "Tensor"))
    tolerances = dict(INDEXER_LOGITS_TOLERANCES)

    def semantic_fields(self, spec):
        ix = spec.indexer
        return {"heads": ix.heads, "head_dim": ix.head_dim, "dtype": ix.dtype}

    def module_stem(self, spec):
        ix = spec.indexer
        return f"indexer_h{ix.heads}_d{ix.head_dim}_{ix.dtype}"

    def derived(self, spec, point, backend):
        return {"d_pad": next_pow2(spec.indexer.head_dim, 32)} if backend == "triton" else {}

    def problem_symbols(self, spec):
        return indexer_symbols(spec)

    def cost(self, spec):
        c = indexer_cost(spec, S * SKV * 4)
        return Cost(self.name, c.flops, c.bytes, c.compute_unit)

    def check_args(self, spec, q, k, k_scale, weights, ks, ke, out=None):
        dev, n_q, n_kv = check_indexer_inputs(spec, q, k, k_scale, weights, ks, ke)
        check_out("out", out, torch.float32, (n_q, n_kv), dev)
        return Call(dev, n_q, n_kv)

    def fake(self, spec, q, k, k_scale, weights, ks, ke):
        return q.new_empty((q.shape[0], k.shape[0]), dtype=torch.float32)

    def reference(self, spec, q, k, k_scale, weights, ks, ke):
        return reference.indexer(q, k, k_scale, weights, ks, ke)

    def inputs(self, spec, S_, SKV_, device, seed):
        return indexer_inputs(spec, S_, SKV_, device, seed)

    def poisoned_outputs(self, spec, inputs):
        q, k = inputs[0], inputs[1]
        return {"out": torch.full((q.shape[0], k.shape[0]), math.nan, device=q.device)}

    def check(self, spec, inputs, result, rows):
        q, k, k_scale, w, ks, ke = inputs
        r = rows.to(q.device)
        ref = reference.indexer(q[r], k, k_scale, w[r], ks[r], ke[r])
        what = f"logits.{spec.indexer.dtype}"
        ratio = assert_close(f"indexer.{what}", result[r], ref, self.tolerance(what))
        return f"float64 reference on {len(rows)} rows, RMS ratio {ratio:.2e}"

    def naive(self, spec, inputs):
        return lambda: naive_indexer(*inputs)

    def shape_info(self, spec, S_, SKV_):
        ix = spec.indexer
        return {"S": S_, "SKV": SKV_, "H": ix.heads, "D": ix.head_dim, "dtype": ix.dtype, "window": "causal"}

    def sizes(self, S_, SKV_):
        return {"S": S_, "SKV": SKV_, "W": causal_window_mean(S_, SKV_)}


register(IndexerOp())
