"""The top-k selector's workload: fp32 logits shaped like the indexer's output, each row's window
the whole row, checked by the exact top-k contract; torch.topk is the baseline."""
from __future__ import annotations

import torch

from .. import reference
from ..verify import assert_topk
from .workload import Workload, few_keys_warning, generator


def naive_topk(x, ks, ke, k: int):
    """torch.topk over whole rows (the workload's windows are whole rows)."""
    return torch.topk(x, min(k, x.shape[1]), dim=1)


def poisoned_indices(spec, n_q: int, device) -> dict[str, torch.Tensor]:
    return {"out": torch.full((n_q, spec.topk.k), -7, dtype=torch.int32, device=device)}


class TopKWorkload(Workload):
    kernel = "topk"
    naive_name = "torch.topk"

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


WORKLOAD = TopKWorkload()
