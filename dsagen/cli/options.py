"""Options and argument parsing shared by the `dsagen` commands."""
from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class Backend(str, Enum):
    triton = "triton"
    tvm = "tvm"


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


class Window(str, Enum):
    full = "full"
    causal = "causal"


SPEC_ARGUMENT = typer.Argument(..., metavar="SPEC", help="TOML spec file")
BACKEND_OPTION = typer.Option(Backend.triton, "--backend", "-b", help="kernel backend: triton or tvm")
GPU_OPTION = typer.Option(None, "--gpu", help="GPU type whose limits and tuning database apply (nvidia-h200, "
                          "nvidia-h100, nvidia-a100; default: the GPU torch sees, else nvidia-h200)")
TARGET_DEVICE_OPTION = typer.Option(Device.cuda, "--device", help="which kernels: cuda (the GPU's), or cpu (the "
                                    "Triton interpreter's rendering; TVM's llvm kernels and the CPU's tuned "
                                    "entries)")


def kernel_help() -> str:
    """--kernel's help, from the registry: every kernel dsagen ships (plugins are not imported for
    a help text: a broken one is reported when a command runs)."""
    from dsagen.ops import own_ops

    listed = ", ".join(op.name + ("" if len(op.backends) > 1 else f" ({op.backends[0]} only)") for op in own_ops())
    return f"kernel (repeatable): {listed}, or any kernel registered through DSAGEN_OPS"


KERNEL_HELP = kernel_help()


def load_checked_spec(path: Path, backend: str):
    """The spec at `path`, with its pinned knobs checked against `backend`'s search spaces: every
    error names the file."""
    from dsagen import load_spec
    from dsagen.errors import ScheduleError
    from dsagen.ops import get_op
    from dsagen.schedule import load_space, split_variant

    spec = load_spec(path)
    for kernel, knobs in spec.schedule.items():
        op = get_op(kernel)
        if backend not in op.backends:
            continue
        try:
            variant, pinned = split_variant(op, backend, knobs)  # the pinned variant's knobs
            load_space(backend, op, variant).check_names(pinned, f"schedule.{kernel}")
        except ScheduleError as exc:
            raise ScheduleError(f"{path}: {exc}") from None
    return spec


def kernel_names(kernel: list[str] | None, default: tuple[str, ...] | None = None, *, spec=None,
                 backend: str | None = None) -> list[str]:
    """--kernel values checked against the registry (default: the three stages) and, given the
    spec and backend, against what a build of that spec offers there."""
    from dsagen.errors import DsagenError
    from dsagen.ops import get_op, stages

    if not kernel:
        names = list(default or stages())
    else:
        for name in kernel:
            try:
                get_op(name)
            except DsagenError as exc:  # bad usage: exit 2 with the known kernels
                raise typer.BadParameter(str(exc), param_hint="'--kernel'") from None
        names = list(dict.fromkeys(kernel))
    if spec is not None:
        check_offered(names, spec, backend)
    return names


def check_offered(names: list[str], spec, backend: str) -> None:
    """Refuse a kernel the spec's build does not offer on `backend` (a decode kernel without a
    [cache] section, a kernel without a template there) with the reason the Python API gives
    when it is called, before anything is generated or run."""
    from dsagen.errors import BackendError
    from dsagen.ops import get_op

    for name in names:
        problem = get_op(name).unavailable(spec, backend)
        if problem:
            raise BackendError(f"--kernel {name}: {problem}")


def check_shape(S: int, SKV: int) -> None:
    """One --S/--SKV pair, held to the rule `shapes` applies to tune and bench."""
    shapes([S], [SKV], None)


def default_kernels(spec, backend: str, shape_set: str | None) -> tuple[str, ...] | None:
    """The kernels a command runs without --kernel: the decode kernels for a decode shape set
    (an error naming the spec when it has no [cache] section), else None (the three stages)."""
    from dsagen.db.buckets import SHAPE_SET_KERNELS
    from dsagen.ops import enabled

    if SHAPE_SET_KERNELS.get(shape_set) != "decode":
        return None
    names = tuple(op.name for op in enabled(spec, backend) if op.needs_cache)
    if not names:
        raise ValueError(f"--shapes {shape_set} times the decode kernels, and spec {spec.name!r} has none on "
                         f"{backend}: add a [cache] section (see specs/deepseek_v32_serving.toml) or pass --kernel")
    return names


def shapes(S: list[int] | None, SKV: list[int] | None, shape_set: str | None) -> list[tuple[int, int]]:
    """--shapes NAME, or every (S, SKV) pair of --S x --SKV with S <= SKV."""
    from dsagen.db.buckets import SHAPE_SETS

    if shape_set is not None:
        if S or SKV:
            raise ValueError("give either --shapes or --S/--SKV, not both")
        if shape_set not in SHAPE_SETS:
            raise ValueError(f"--shapes {shape_set!r} is not a named set: allowed {', '.join(SHAPE_SETS)}")
        return list(SHAPE_SETS[shape_set])
    if not S or not SKV:
        raise ValueError("give the shapes: --S and --SKV (each repeatable), or --shapes NAME")
    pairs = [(s, skv) for s in S for skv in SKV if s <= skv]
    if not pairs:
        raise ValueError("no shape with S <= SKV among --S x --SKV (the queries are the last S of SKV tokens)")
    return pairs


def run_device(command: str, backend: Backend, device: Device | None, cpu_hint: str) -> Device:
    """--device for commands that run kernels: by default cuda when torch sees a GPU (always for
    Triton, whose CPU path is only an interpreter), else cpu; cuda without a GPU is an error that
    says what to do instead."""
    import torch

    if device is None:
        device = Device.cuda if torch.cuda.is_available() or backend == Backend.triton else Device.cpu
    if device == Device.cuda and not torch.cuda.is_available():
        raise ValueError(f"dsagen {command} --backend {backend.value} --device cuda needs a CUDA GPU, and torch "
                         f"sees none ({cpu_hint})")
    return device


def resolver_for(spec, backend: Backend, gpu: str | None):
    """The resolver a build on this machine would use, for the named GPU type (or the one torch
    sees, else the H200 of the shipped database)."""
    from dsagen.resolve import DEFAULT_GPU, Resolver, gpu_context

    gpu_type, capability = gpu_context(gpu, default=DEFAULT_GPU)
    return Resolver(spec, backend.value, gpu_type, capability)
