"""Step 4 of the pipeline, lower: spec + resolved schedule -> the template context of one kernel.

A context holds only validated integers, floats rendered by repr(), and enum strings from a fixed
set (the op's `template_fields`, `derived` sizes and the schedule's knobs): nothing a user typed
reaches generated code as text. It also spells out the module's name, the variant (the algorithm,
for an op that declares several) first.
"""
from __future__ import annotations

from typing import Any, Mapping

from .ops import Op, as_op
from .plan import semantic_hash
from .spec import Spec


def _knob_fields(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def module_suffix(op: Op, point: Mapping[str, int], backend: str) -> str:
    """Every knob spelled out in the module's name: Triton modules use the op's short names in the
    space's order, other backends the knob names without '_', sorted."""
    if backend == "triton" and op.short_names:
        rest = sorted(set(point) - set(op.short_names))
        return ("".join(f"_{op.short_names[k]}{point[k]}" for k in op.short_names if k in point)
                + "".join(f"_{k.replace('_', '')}{point[k]}" for k in rest))
    return "".join(f"_{k.replace('_', '')}{v}" for k, v in sorted(point.items()))


def kernel_context(spec: Spec, kernel: str | Op, point: Mapping[str, int], backend: str = "triton",
                   interpret: bool = False, variant: str | None = None) -> dict[str, Any]:
    """Numbers the template of `kernel` (an op, or its name) is rendered from.

    interpret: render for the Triton interpreter (CPU tensors), whose work-arounds stay out of the
    GPU kernels; the module's name says so (`_interp`). variant: which of the op's declared
    algorithms (its template); None for an op that declares none."""
    op = as_op(kernel)
    op.variant(backend, variant)  # a name the op does not declare is an error here, not a missing template
    point = {k: int(v) for k, v in point.items()}
    interpret = bool(interpret and backend == "triton")
    fields = op.template_fields(spec)
    prefix = "" if backend == "triton" else f"{backend}_"
    named = {} if variant is None else {"variant": variant}
    stem = (prefix + op.module_stem(spec) + "".join(f"_{v}" for v in named.values())
            + module_suffix(op, point, backend) + ("_interp" if interpret else ""))
    return {
        "kernel": op.name,
        **named,
        "semantic_hash": semantic_hash(spec, [op]),
        "spec_fields": _knob_fields(fields),
        **fields,
        **op.derived(spec, point, backend),
        "module_stem": stem,
        "schedule_fields": _knob_fields({**named, **point}),
        "interpret": interpret,
        **point,
    }
