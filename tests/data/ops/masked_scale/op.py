"""A kernel defined outside dsagen, to prove that adding one needs no edit of dsagen/: this op
module, its templates (both backends), its schedule files and its test.

masked_scale: out[t, s] = scale[t] * x[t, s] inside the row's window [ks[t], ke[t]), -inf outside.
Registered by importing this file (tests do it in-process, and through DSAGEN_OPS for the CLI and
the tuner's worker processes).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from dsagen.ops import Call, Cost, Op, register
from dsagen.ops.base import SKV, S, check_out, check_tensor, generator
from dsagen.verify import Mismatch


def reference_masked_scale(x, scale, ks, ke):
    cols = torch.arange(x.shape[1])[None, :]
    inside = (cols >= ks.cpu().long()[:, None]) & (cols < ke.cpu().long()[:, None])
    ref = x.cpu().double() * scale.cpu().double()[:, None]
    return torch.where(inside, ref, torch.full_like(ref, -math.inf))


class MaskedScaleOp(Op):
    name = "masked_scale"
    summary = "test kernel: scale each row of x inside its window, -inf outside"
    backends = ("triton", "tvm")
    data_root = Path(__file__).resolve().parent
    args = (("x", "Tensor"), ("scale", "Tensor"), ("ks", "Tensor"), ("ke", "Tensor"))
    naive_name = "torch.where"

    def semantic_fields(self, spec):
        return {"width": spec.topk.k}  # any spec field will do; its width is only a name here

    def module_stem(self, spec):
        return "masked_scale"

    def cost(self, spec):
        return Cost(self.name, S * SKV, S * SKV * 8 + S * 12, "none")

    def check_args(self, spec, x, scale, ks, ke, out=None):
        check_tensor("x", x, torch.float32, (None, None))
        dev, n = x.device, x.shape[0]
        check_tensor("scale", scale, torch.float32, (n,), dev)
        check_tensor("ks", ks, torch.int32, (n,), dev)
        check_tensor("ke", ke, torch.int32, (n,), dev)
        check_out("out", out, torch.float32, tuple(x.shape), dev)
        return Call(dev, n, x.shape[1])

    def fake(self, spec, x, scale, ks, ke):
        return torch.empty_like(x)

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


register(MaskedScaleOp())
