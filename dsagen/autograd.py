"""Gradients of dsagen's torch ops: `dsagen::<kernel>` is differentiated by another registered op.

Why here: an op declares only its `Gradient` (dsagen/ops/base.py: the backward op, the outputs
without gradient, how the backward's arguments and the input gradients map); this module turns
that into a `torch.library.register_autograd` formula, so eager autograd,
`torch.compile(fullgraph=True)` (forward and backward traced as one node each) and CUDA graphs all
see the same two ops. The backward runs the build that ran the forward (the build handle is an op
argument), so it uses that build's backend, schedules and deterministic mode.

The backward ops themselves have no backward: differentiating a gradient a second time (after
`torch.autograd.grad(..., create_graph=True)`) raises, naming the op, instead of torch's default for
an op without a formula (a warning and zero gradients).
"""
from __future__ import annotations

from typing import Mapping

import torch

from .ops import all_ops, get_op


def register(op, library, namespace: str, call) -> None:
    """Attach the backward of `op` (when it has one) to the op `namespace::<op.name>`; else, when
    `op` is the backward of other ops, a formula that refuses a double backward.

    call(kernel, args, handle) runs a registered op (torch_ops.call)."""
    kernel, grad = op.name, op.gradient
    if not grad.differentiable:
        forwards = [fwd.name for fwd in all_ops() if fwd.gradient.backward == kernel]
        if forwards:
            _refuse_double_backward(kernel, forwards, library, namespace)
        return
    names, returns = op.signature.names, op.signature.returns

    def setup_context(ctx, inputs, output):
        *args, handle = inputs
        outputs = output if isinstance(output, tuple) else (output,)
        for name, value in zip(returns, outputs):
            if name in grad.non_differentiable:
                ctx.mark_non_differentiable(value)
        tensors = [a for a in args if isinstance(a, torch.Tensor)] + list(outputs)
        ctx.save_for_backward(*tensors)
        # where each argument went: a saved tensor (its position) or a plain value (kept as is)
        ctx.slots = [("t", None) if isinstance(a, torch.Tensor) else ("v", a) for a in args]
        ctx.handle = handle

    def backward(ctx, *grads):
        saved = list(ctx.saved_tensors)
        inputs, k = {}, 0
        for name, (kind, value) in zip(names, ctx.slots):
            if kind == "t":
                inputs[name], k = saved[k], k + 1
            else:
                inputs[name] = value
        outputs = dict(zip(returns, saved[k:]))
        wanted = {n: g.contiguous() for n, g in zip(returns, grads) if n not in grad.non_differentiable}
        args = grad.backward_args(inputs, outputs, wanted)
        by_name = grad.input_gradients(_run_backward(grad.backward, args, ctx.handle, call, namespace))
        return (*(by_name.get(n) if ctx.needs_input_grad[i] else None for i, n in enumerate(names)), None)

    torch.library.register_autograd(f"{namespace}::{kernel}", backward, setup_context=setup_context, lib=library)


def _run_backward(kernel: str, args, handle: str, call, namespace: str) -> tuple:
    """The backward op's outputs, as a tuple. `args`: its arguments in signature order (a tuple), or
    by name with a buffer for each returned output and for the extra outputs wanted (a mapping; say,
    the sink's gradient, which sparse_attention_bwd writes only into a buffer given): those run
    through namespace::<kernel>_out and come back as the returned outputs, then the extra ones given."""
    if not isinstance(args, Mapping):
        result = call(kernel, tuple(args), handle)
        return result if isinstance(result, tuple) else (result,)
    signature = get_op(kernel).signature
    buffers = tuple(args.get(name) for name in signature.buffers)
    write = getattr(getattr(torch.ops, namespace), f"{kernel}_out")
    write(*(args[name] for name in signature.names), *buffers, handle)
    return tuple(b for b in buffers if b is not None)


def _refuse_double_backward(kernel: str, forwards: list, library, namespace: str) -> None:
    """Give `namespace::kernel` (the backward of `forwards`) a formula that raises when reached: its
    outputs then carry a graph under create_graph=True, and only a second differentiation fails."""
    names = " / ".join(forwards)

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{names}: double backward (create_graph=True) is not supported; its gradients come from "
            f"dsagen::{kernel}, which has no backward of its own")

    torch.library.register_autograd(f"{namespace}::{kernel}", backward, setup_context=setup_context, lib=library)
