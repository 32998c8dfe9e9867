"""Lowering: spec + chosen schedule -> the template context of one kernel.

Step 3 of the pipeline. A context holds only validated integers, floats rendered by repr(), and
enum strings from a fixed set: nothing a user typed reaches generated code as text.
"""
from __future__ import annotations

from typing import Any

from .plan import next_pow2
from .spec import Spec


def _knob_fields(point: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def _generic_name(stem: str, point: dict[str, int]) -> str:
    """<stem>_<knob><value>_...: every knob spelled out (used by backends other than Triton)."""
    return stem + "".join(f"_{k.replace('_', '')}{v}" for k, v in sorted(point.items()))


def kernel_context(spec: Spec, kernel: str, point: dict[str, int], backend: str = "triton",
                   interpret: bool = False) -> dict[str, Any]:
    """Numbers the template of `kernel` is rendered from; also spells out the module's name.

    interpret: render for the Triton interpreter (CPU tensors), whose work-arounds stay out of the
    GPU kernels; the module's name says so (`_interp`)."""
    point = {k: int(v) for k, v in point.items()}
    context = kernel_context_fields(spec, kernel)
    if backend == "triton":
        stem = context["module_stem"] + _triton_name_suffix(kernel, point) + ("_interp" if interpret else "")
        derived = _triton_derived(spec, kernel, point)
    else:
        stem = _generic_name(f"{backend}_{context['module_stem']}", point)
        derived = {}
    return {**context, **derived, "module_stem": stem, "schedule_fields": _knob_fields(point),
            "interpret": bool(interpret and backend == "triton"), **point}


def _triton_name_suffix(kernel: str, p: dict[str, int]) -> str:
    """The Triton module names' short spelling of each kernel's knobs."""
    if kernel == "indexer":
        return f"_m{p['block_m']}_hb{p['block_h']}_n{p['block_n']}_w{p['num_warps']}_s{p['num_stages']}"
    if kernel == "indexer_topk":
        return (f"_m{p['block_m']}_hb{p['block_h']}_n{p['block_n']}_r{p['radix_bits']}_w{p['num_warps']}"
                f"_s{p['num_stages']}_smp{p['sample']}_c{p['candidates']}")
    if kernel == "topk":
        return (f"_n{p['block_n']}_r{p['radix_bits']}_w{p['num_warps']}"
                f"_res{p['resident_max']}_rw{p['resident_warps']}_smp{p['sample']}_c{p['candidates']}_rr{p['row_reads']}")
    return (f"_bh{p['block_h']}_n{p['block_n']}_vs{p['v_split']}_w{p['num_warps']}_s{p['num_stages']}"
            f"_ip{p['index_prefetch']}")


def _triton_derived(spec: Spec, kernel: str, point: dict[str, int]) -> dict[str, Any]:
    """Padded sizes the Triton templates need (block shapes are powers of two)."""
    if kernel == "indexer":
        return {"d_pad": next_pow2(spec.indexer.head_dim, 32)}
    if kernel == "indexer_topk":
        # the per-row kernel's dot has one row's heads as M: at least 16 of them
        row_block_h = point["block_h"] if point["block_m"] == 1 else max(16, min(64, next_pow2(spec.indexer.heads)))
        return {"d_pad": next_pow2(spec.indexer.head_dim, 32), "row_block_h": row_block_h}
    if kernel == "sparse_attention":
        at = spec.attention
        dv_pad = next_pow2(at.v_dim, 16)
        return {"rope_dim": at.rope_dim, "dv_pad": dv_pad,
                "dr_pad": next_pow2(at.rope_dim, 16) if at.rope_dim else 16,
                "dv_chunk": dv_pad // point["v_split"]}
    return {}


def kernel_context_fields(spec: Spec, kernel: str) -> dict[str, Any]:
    """The spec's numbers for `kernel` and a stem naming them (no schedule): shared by backends."""
    if kernel == "indexer":
        ix = spec.indexer
        fields = {"heads": ix.heads, "head_dim": ix.head_dim, "dtype": ix.dtype}
        stem = f"indexer_h{ix.heads}_d{ix.head_dim}_{ix.dtype}"
    elif kernel == "indexer_topk":
        ix = spec.indexer
        fields = {"heads": ix.heads, "head_dim": ix.head_dim, "dtype": ix.dtype, "k": spec.topk.k}
        stem = f"indexer_topk_h{ix.heads}_d{ix.head_dim}_{ix.dtype}_k{spec.topk.k}"
    elif kernel == "topk":
        fields = {"k": spec.topk.k}
        stem = f"topk_k{spec.topk.k}_fp32"
    elif kernel == "sparse_attention":
        at = spec.attention
        fields = {"heads": at.heads, "qk_dim": at.qk_dim, "v_dim": at.v_dim, "dtype": at.dtype,
                  "topk": spec.topk.k}  # sm_scale is a run-time argument, not part of the module
        stem = f"sparse_attention_h{at.heads}_dqk{at.qk_dim}_dv{at.v_dim}_{at.dtype}"
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return {
        "kernel": kernel,
        "module_stem": stem,
        "semantic_hash": spec.semantic_hash(kernel),
        "spec_fields": _knob_fields(fields),
        **fields,
    }

