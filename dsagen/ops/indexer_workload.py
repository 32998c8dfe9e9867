"""The lightning indexer's workload: causal windows of the last S queries of an SKV context,
checked against the float64 logits; a chunked bf16 einsum is the baseline."""
from __future__ import annotations

import math

import torch

from .. import reference
from ..plan import causal_window_mean
from ..verify import assert_close
from .shared import INDEXER_LOGITS_TOLERANCES, TORCH_DTYPES
from .workload import Workload, causal_windows, generator


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


def causal_sizes(S_: int, SKV_: int) -> dict[str, float]:
    return {"S": S_, "SKV": SKV_, "W": causal_window_mean(S_, SKV_)}


class IndexerWorkload(Workload):
    kernel = "indexer"
    naive_name = "bf16 einsum + relu + weights (chunks of 256)"
    tolerances = dict(INDEXER_LOGITS_TOLERANCES)

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
        return causal_sizes(S_, SKV_)


WORKLOAD = IndexerWorkload()
