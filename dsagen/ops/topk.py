"""Stage 2, the top-k selector: per row, the indices of the k largest logits of its window
[ks, ke), in any order, then -1 padding; int32, exact (ties included)."""
from __future__ import annotations

import sympy as sp
import torch

from ..plan import SKV, Cost, S
from .base import Call, Op
from .checks import check_out, check_tensor
from .signature import Signature, tensor


def check_topk_out(spec, out, n_q: int, dev) -> None:
    check_out("out", out, torch.int32, (n_q, spec.topk.k), dev)


class TopKOp(Op):
    name = "topk"
    position = 20
    summary = "top-k selector: int32 indices [S, k] of each row's k largest logits, -1 padded"
    doc = "indices [S, k] int32: the k largest logits of each row's window [ks, ke), then -1 padding."
    backends = ("triton", "tvm")
    stage = True
    short_names = {"block_n": "n", "radix_bits": "r", "num_warps": "w", "resident_max": "res",
                   "resident_warps": "rw", "sample": "smp", "candidates": "c", "row_reads": "rr"}
    signature = Signature((tensor("logits"), tensor("ks"), tensor("ke")))

    def semantic_fields(self, spec):
        return {"k": spec.topk.k}

    def module_stem(self, spec):
        return f"topk_k{spec.topk.k}_fp32"

    def problem_symbols(self, spec):
        return {"k": spec.topk.k}

    def cost(self, spec):
        return Cost(self.name, sp.Integer(0), S * SKV * 4 + S * 8 + S * spec.topk.k * 4, "none")

    def check_args(self, spec, logits, ks, ke, out=None):
        check_tensor("logits", logits, torch.float32, (None, None))
        dev, n_q = logits.device, logits.shape[0]
        check_tensor("ks", ks, torch.int32, (n_q,), dev)
        check_tensor("ke", ke, torch.int32, (n_q,), dev)
        check_topk_out(spec, out, n_q, dev)
        return Call(dev, n_q, logits.shape[1])

    def fake(self, spec, logits, ks, ke):
        return logits.new_empty((logits.shape[0], spec.topk.k), dtype=torch.int32)


TOPK = TopKOp()
