"""Stage 1, the lightning indexer: logits[t, s] = k_scale[s] * sum_j w[t, j] * relu(q[t, j] . k[s])
inside each row's key window [ks[t], ke[t]), -inf outside; fp8 e4m3 or bf16 inputs, fp32 out."""
from __future__ import annotations

import torch

from ..plan import SKV, Cost, S, W, next_pow2
from .base import Call, Gradient, Op
from .checks import check_out, check_tensor
from .shared import ELEM_BYTES, INDEXER_TRAINS_THROUGH_LOSS, TORCH_DTYPES
from .signature import Signature, tensor

# the indexer's arguments, shared with the fused indexer + top-k
INDEXER_ARGS = (tensor("q"), tensor("k"), tensor("k_scale", optional=True), tensor("weights"), tensor("ks"),
                tensor("ke"))


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
    doc = "logits [S, SKV] fp32: k_scale[s] * sum_j weights[t,j] * relu(q[t,j] . k[s]) in [ks[t], ke[t])."
    backends = ("triton", "tvm")
    stage = True
    short_names = {"block_m": "m", "block_h": "hb", "block_n": "n", "num_warps": "w", "num_stages": "s"}
    signature = Signature(INDEXER_ARGS)
    gradient = Gradient(hint=INDEXER_TRAINS_THROUGH_LOSS)

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


INDEXER = IndexerOp()
