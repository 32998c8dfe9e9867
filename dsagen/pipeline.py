"""The straight path of one spec: choose a schedule -> lower -> render, for each kernel.

Used by `dsagen.build` (which then compiles and runs) and by `dsagen generate/show`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .codegen import GeneratedSource, render
from .gpus import GPU, get_gpu
from .lower import kernel_context
from .schedule import Choice, choose
from .spec import KERNELS, Spec

DEFAULT_GPU = "nvidia-h200"


@dataclass(frozen=True)
class KernelSource:
    choice: Choice
    generated: GeneratedSource


def kernel_source(spec: Spec, kernel: str, backend: str = "triton", gpu: GPU | str = DEFAULT_GPU,
                  override: Mapping[str, int] | None = None, interpret: bool = False) -> KernelSource:
    gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
    choice = choose(spec, kernel, gpu, backend, override)
    return KernelSource(choice, render(backend, kernel_context(spec, kernel, choice.point, backend, interpret)))


def all_sources(spec: Spec, backend: str = "triton", gpu: GPU | str = DEFAULT_GPU,
                overrides: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, KernelSource]:
    overrides = overrides or {}
    return {k: kernel_source(spec, k, backend, gpu, overrides.get(k)) for k in KERNELS}
