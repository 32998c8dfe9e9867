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


def kernel_context(spec: Spec, kernel: str, point: dict[str, int], backend: str = "triton") -> dict[str, Any]:
    """Numbers the template of `kernel` is rendered from; also spells out the module's name."""
    point = {k: int(v) for k, v in point.items()}
    if backend != "triton":
        context = kernel_context_fields(spec, kernel)
        return {**context, "module_stem": _generic_name(f"{backend}_{context['module_stem']}", point),
                "schedule_fields": _knob_fields(point), **point}
    if kernel == "indexer":
        ix = spec.indexer
        fields = {"heads": ix.heads, "head_dim": ix.head_dim, "dtype": ix.dtype}
        derived = {"d_pad": next_pow2(ix.head_dim, 32)}
        name = (f"indexer_h{ix.heads}_d{ix.head_dim}_{ix.dtype}"
                f"_m{point['block_m']}_hb{point['block_h']}_n{point['block_n']}"
                f"_w{point['num_warps']}_s{point['num_stages']}")
    elif kernel == "indexer_topk":
        ix = spec.indexer
        fields = {"heads": ix.heads, "head_dim": ix.head_dim, "dtype": ix.dtype, "k": spec.topk.k}
        derived = {"d_pad": next_pow2(ix.head_dim, 32)}
        name = (f"indexer_topk_h{ix.heads}_d{ix.head_dim}_{ix.dtype}_k{spec.topk.k}"
                f"_hb{point['block_h']}_n{point['block_n']}_r{point['radix_bits']}_w{point['num_warps']}")
    elif kernel == "topk":
        fields = {"k": spec.topk.k}
        derived = {}
        name = (f"topk_k{spec.topk.k}_fp32_n{point['block_n']}_r{point['radix_bits']}_w{point['num_warps']}"
                f"_res{point['resident_max']}_rw{point['resident_warps']}")
    elif kernel == "sparse_attention":
        at = spec.attention
        dv_pad = next_pow2(at.v_dim, 16)
        fields = {"heads": at.heads, "qk_dim": at.qk_dim, "v_dim": at.v_dim, "dtype": at.dtype,
                  "topk": spec.topk.k}
        derived = {
            "rope_dim": at.rope_dim,
            "dv_pad": dv_pad,
            "dr_pad": next_pow2(at.rope_dim, 16) if at.rope_dim else 16,
            "dv_chunk": dv_pad // point["v_split"],
            "sm_scale": repr(float(at.softmax_scale)),
        }
        name = (f"sparse_attention_h{at.heads}_dqk{at.qk_dim}_dv{at.v_dim}_{at.dtype}"
                f"_bh{point['block_h']}_n{point['block_n']}_vs{point['v_split']}"
                f"_w{point['num_warps']}_s{point['num_stages']}")
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return {
        "kernel": kernel,
        "module_stem": name,
        "semantic_hash": spec.semantic_hash(kernel),
        "spec_fields": _knob_fields(fields),
        "schedule_fields": _knob_fields(point),
        **fields,
        **derived,
        **point,
    }


def kernel_context_fields(spec: Spec, kernel: str) -> dict[str, Any]:
    """The spec's numbers for `kernel` and a stem naming them (no schedule): shared by backends."""
    if kernel == "indexer":
        ix = spec.indexer
        fields = {"heads": ix.heads, "head_dim": ix.head_dim, "dtype": ix.dtype}
        stem = f"indexer_h{ix.heads}_d{ix.head_dim}_{ix.dtype}"
    elif kernel == "topk":
        fields = {"k": spec.topk.k}
        stem = f"topk_k{spec.topk.k}_fp32"
    elif kernel == "sparse_attention":
        at = spec.attention
        fields = {"heads": at.heads, "qk_dim": at.qk_dim, "v_dim": at.v_dim, "dtype": at.dtype,
                  "topk": spec.topk.k, "sm_scale": repr(float(at.softmax_scale))}
        stem = f"sparse_attention_h{at.heads}_dqk{at.qk_dim}_dv{at.v_dim}_{at.dtype}"
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    shown = {k: v for k, v in fields.items() if k != "sm_scale"}
    return {
        "kernel": kernel,
        "module_stem": stem,
        "semantic_hash": spec.semantic_hash(kernel),
        "spec_fields": _knob_fields(shown),
        **fields,
    }

