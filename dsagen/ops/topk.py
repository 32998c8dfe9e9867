"""Stage 2, the top-k selector: per row, the indices of the k largest logits of its window
[ks, ke), in any order, then -1 padding; int32, exact (ties included)."""
from __future__ import annotations

import sympy as sp
import torch

from .. import reference
from ..verify import assert_topk
from . import register
from .base import SKV, Call, Cost, Op, S, check_out, check_tensor, few_keys_warning, generator


def check_topk_out(spec, out, n_q: int, dev) -> None:
    check_out("out", out, torch.int32, (n_q, spec.topk.k), dev)


def naive_topk(x, ks, ke, k: int):
    """torch.topk over whole rows (the workload's windows are whole rows)."""
    return torch.topk(x, min(k, x.shape[1]), dim=1)


def poisoned_indices(spec, n_q: int, device) -> dict[str, torch.Tensor]:
    return {"out": torch.full((n_q, spec.topk.k), -7, dtype=torch.int32, device=device)}


class TopKOp(Op):
    name = "topk"
    position = 20
    summary = "top-k selector: int32 indices [S, k] of each row's k largest logits, -1 padded"
    backends = ("triton", "tvm")
    stage = True
    short_names = {"block_n": "n", "radix_bits": "r", "num_warps": "w", "resident_max": "res",
                   "resident_warps": "rw", "sample": "smp", "candidates": "c", "row_reads": "rr"}
    naive_name = "torch.topk"
    args = (("logits", "Tensor"), ("ks", "Tensor"), ("ke", "Tensor"))

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

    def reference(self, spec, logits, ks, ke):
        """The k largest values per row (sorted): what any exact selection picks; ties make the
        indices ambiguous, never these values."""
        return reference.topk_values(logits, ks, ke, spec.topk.k)

    def inputs(self, spec, S_, SKV_, device, seed):
        """fp32 logits shaped like the indexer's output, every row's window the whole row (so that
        torch.topk is the fair naive baseline)."""
        x = torch.randn(S_, SKV_, device=device, generator=generator(device, seed))
        ks = torch.zeros(S_, dtype=torch.int32, device=device)
        ke = torch.full((S_,), SKV_, dtype=torch.int32, device=device)
        return (x, ks, ke)

    def poisoned_outputs(self, spec, inputs):
        return poisoned_indices(spec, inputs[0].shape[0], inputs[0].device)

    def check(self, spec, inputs, result, rows):
        x, ks, ke = inputs
        r = rows.to(x.device)
        assert_topk(result[r], x[r], ks[r], ke[r], spec.topk.k)
        return f"exact top-k contract on {len(rows)} rows"

    def naive(self, spec, inputs):
        return lambda: naive_topk(*inputs, spec.topk.k)

    def shape_info(self, spec, S_, SKV_):
        return {"S": S_, "SKV": SKV_, "k": spec.topk.k, "dtype": "fp32", "window": "full row"}

    def bench_warning(self, spec, S_, SKV_):
        return few_keys_warning(spec, SKV_)


register(TopKOp())
