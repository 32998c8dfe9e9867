"""masked_scale's workload: random rows and windows, checked exactly against the float64
reference; torch.where is the baseline. Only tests, `dsagen tune` and `dsagen bench` import it."""
from __future__ import annotations

import math

import torch

from dsagen.ops.workload import Workload, generator
from dsagen.verify import Mismatch


def reference_masked_scale(x, scale, ks, ke):
    cols = torch.arange(x.shape[1])[None, :]
    inside = (cols >= ks.cpu().long()[:, None]) & (cols < ke.cpu().long()[:, None])
    ref = x.cpu().double() * scale.cpu().double()[:, None]
    return torch.where(inside, ref, torch.full_like(ref, -math.inf))


class MaskedScaleWorkload(Workload):
    kernel = "masked_scale"
    naive_name = "torch.where"

    def reference(self, spec, x, scale, ks, ke):
        return reference_masked_scale(x, scale, ks, ke)

    def inputs(self, spec, S_, SKV_, device, seed):
        g = generator(device, seed)
        x = torch.randn(S_, SKV_, device=device, generator=g)
        scale = torch.rand(S_, device=device, generator=g) + 0.5
        ks = torch.randint(0, SKV_, (S_,), device=device, generator=g, dtype=torch.int32)
        ke = torch.clamp(ks + torch.randint(0, SKV_, (S_,), device=device, generator=g, dtype=torch.int32), max=SKV_)
        return (x, scale, ks, ke)

    def poisoned_outputs(self, spec, inputs):
        return {"out": torch.full_like(inputs[0], math.nan)}

    def check(self, spec, inputs, result, rows):
        r = rows.to(inputs[0].device)
        x, scale, ks, ke = inputs
        ref = reference_masked_scale(x[r], scale[r], ks[r], ke[r])
        got = result[r].cpu().double()
        if not torch.equal(torch.isnan(got), torch.zeros_like(got, dtype=torch.bool)) or not torch.allclose(got, ref):
            raise Mismatch("masked_scale: wrong values")
        return f"exact on {len(rows)} rows"

    def naive(self, spec, inputs):
        x, scale, ks, ke = inputs
        cols = torch.arange(x.shape[1], device=x.device)[None, :]
        return lambda: torch.where((cols >= ks[:, None]) & (cols < ke[:, None]), x * scale[:, None], -math.inf)


WORKLOAD = MaskedScaleWorkload()
