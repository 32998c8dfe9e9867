"""The compositions of a build, declared as data: which kernels run in which order, and how each
step's outputs feed the next ones' inputs. `run_pipeline` is the one interpreter; `dsa()` and
`decode()` (dsagen/kernels.py) check their arguments and call it.

A pipeline is a sequence of steps over named values (the caller's arguments, then each step's
outputs). A step is a kernel call (its inputs named in argument order, its outputs named in
return order), a reshape glue (`Apply`), or alternatives (`First`): the first branch whose
condition holds on the build runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import torch


@dataclass(frozen=True)
class Call:
    """Run `kernel` on the named values `inputs`; name its results `outputs`. no_grad: the step's
    result is integer-valued (a selection), so no gradient flows through it."""

    kernel: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    no_grad: bool = False


@dataclass(frozen=True)
class Apply:
    """Glue between kernels: outputs = fn(build, values)."""

    fn: Callable[[Any, Mapping[str, Any]], tuple]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class First:
    """Alternatives: the first (condition(build), steps) whose condition holds runs."""

    branches: tuple[tuple[Callable[[Any], bool], tuple["Step", ...]], ...]


Step = Union[Call, Apply, First]


@dataclass(frozen=True)
class Pipeline:
    name: str
    steps: tuple[Step, ...]
    returns: tuple[str, ...]


def run_pipeline(kernels, pipeline: Pipeline, values: Mapping[str, Any]) -> tuple:
    """Run every step of `pipeline` on a build, starting from the caller's named `values`; return
    the values named by `pipeline.returns`."""
    env = dict(values)
    _run_steps(kernels, pipeline.steps, env)
    return tuple(env[name] for name in pipeline.returns)


def _run_steps(kernels, steps, env: dict) -> None:
    for step in steps:
        if isinstance(step, First):
            branch = next(s for condition, s in step.branches if condition(kernels))
            _run_steps(kernels, branch, env)
            continue
        if isinstance(step, Apply):
            results = step.fn(kernels, env)
        else:
            guard = torch.no_grad() if step.no_grad else contextlib.nullcontext()
            with guard:
                results = kernels.run(step.kernel, *(env[name] for name in step.inputs))
        results = results if isinstance(results, tuple) else (results,)
        env.update(zip(step.outputs, results))


def fused_selection(kernels) -> bool:
    """The spec asks for the fused indexer + top-k and this build offers it."""
    return kernels.spec.topk.fused and kernels.kernel("indexer_topk").op.enabled(kernels.spec, kernels.backend)


INDEX_INPUTS = ("index_q", "index_k", "index_k_scale", "index_weights", "ks", "ke")

DSA = Pipeline(
    "dsa",
    steps=(
        First((
            (fused_selection, (Call("indexer_topk", INDEX_INPUTS, ("indices",), no_grad=True),)),
            (lambda kernels: True, (Call("indexer", INDEX_INPUTS, ("logits",), no_grad=True),
                                    Call("topk", ("logits", "ks", "ke"), ("indices",), no_grad=True))),
        )),
        Call("sparse_attention", ("q", "kv", "indices", "sm_scale", "attn_sink"), ("out", "lse")),
    ),
    returns=("out", "lse", "indices"),
)


def _slots_per_query(kernels, env) -> tuple:
    """The decode top-k's slots as [B, s_q, k] (with no request the top-k cannot tell s_q; q can)."""
    q, slots = env["q"], env["slots"]
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        slots = slots.reshape(q.shape[0], q.shape[1], kernels.spec.topk.k)
    return (slots,)


DECODE = Pipeline(
    "decode",
    steps=(
        Call("paged_indexer", ("index_q", "index_cache", "index_weights", "context_lens", "block_table"), ("logits",)),
        Call("decode_topk", ("logits", "context_lens", "block_table"), ("slots",)),
        Apply(_slots_per_query, ("slots",)),
        # the window cache (cache.window > 0) is attended in the same softmax as the selection
        Call("sparse_decode", ("q", "mla_cache", "slots", "sm_scale", "attn_sink", "topk_length", "window_cache",
                               "window_indices", "window_lengths"), ("out", "lse")),
    ),
    returns=("out", "lse", "slots"),
)
