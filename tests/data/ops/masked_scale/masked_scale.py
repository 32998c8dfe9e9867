"""A kernel defined outside dsagen, written as dsagen's own are: this op module (its signature,
specialization, checks and fake), its workload module beside it (masked_scale_workload.py: inputs,
reference, check, baseline), its templates (both backends) and its schedule files.

masked_scale: out[t, s] = scale[t] * x[t, s] inside the row's window [ks[t], ke[t]), -inf outside.
Registered by `dsagen.ops.load_plugin` on this file (tests do it in-process, and through
DSAGEN_OPS for the CLI and the tuner's worker processes); dropped into dsagen/ops/, the same file
is an in-tree kernel.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dsagen.ops.base import Call, Op
from dsagen.ops.checks import check_out, check_tensor
from dsagen.ops.signature import Signature, tensor
from dsagen.plan import SKV, Cost, S


class MaskedScaleOp(Op):
    name = "masked_scale"
    summary = "test kernel: scale each row of x inside its window, -inf outside"
    doc = "out [S, SKV] fp32: scale[t] * x[t, s] inside the row's window [ks[t], ke[t]), -inf outside."
    backends = ("triton", "tvm")
    data_root = Path(__file__).resolve().parent
    signature = Signature((tensor("x"), tensor("scale"), tensor("ks"), tensor("ke")))

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


MASKED_SCALE = MaskedScaleOp()
