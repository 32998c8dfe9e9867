"""Lowering: spec + chosen schedule -> the template context of one kernel.

Step 4 of the pipeline. A context holds only validated integers, floats rendered by repr(), and
enum strings from a fixed set (the op's `template_fields`, `derived` sizes and the schedule's
knobs): nothing a user typed reaches generated code as text.
"""
from __future__ import annotations

from typing import Any, Mapping

from .ops import get_op
from .spec import Spec


def _knob_fields(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def module_suffix(kernel: str, point: Mapping[str, int], backend: str) -> str:
    """Every knob spelled out in the module's name: Triton modules use the op's short names in the
    space's order, other backends the knob names without '_', sorted."""
    op = get_op(kernel)
    if backend == "triton" and op.short_names:
        rest = sorted(set(point) - set(op.short_names))
        return ("".join(f"_{op.short_names[k]}{point[k]}" for k in op.short_names if k in point)
                + "".join(f"_{k.replace('_', '')}{point[k]}" for k in rest))
    return "".join(f"_{k.replace('_', '')}{v}" for k, v in sorted(point.items()))


def kernel_context(spec: Spec, kernel: str, point: Mapping[str, int], backend: str = "triton",
                   interpret: bool = False) -> dict[str, Any]:
    """Numbers the template of `kernel` is rendered from; also spells out the module's name.

    interpret: render for the Triton interpreter (CPU tensors), whose work-arounds stay out of the
    GPU kernels; the module's name says so (`_interp`)."""
    op = get_op(kernel)
    point = {k: int(v) for k, v in point.items()}
    interpret = bool(interpret and backend == "triton")
    fields = op.template_fields(spec)
    prefix = "" if backend == "triton" else f"{backend}_"
    stem = prefix + op.module_stem(spec) + module_suffix(kernel, point, backend) + ("_interp" if interpret else "")
    return {
        "kernel": kernel,
        "semantic_hash": spec.semantic_hash(kernel),
        "spec_fields": _knob_fields(fields),
        **fields,
        **op.derived(spec, point, backend),
        "module_stem": stem,
        "schedule_fields": _knob_fields(point),
        "interpret": interpret,
        **point,
    }
