"""What a kernel family is to dsagen: one `Op` per family, declared in parts, so no stage switches
on a kernel's name.

- **signature** (`dsagen.ops.signature.Signature`): its arguments with their torch types and
  defaults, the outputs it returns, its extra optional outputs and what it writes in place;
- **specialization**: the spec fields its math reads (`semantic_fields`: the tuning database's
  key), the template's fields, the module's name, derived tile sizes, its problem symbols, its
  costs (sympy, dsagen.plan), its backends, where its templates and schedules are, the short
  knob names of its Triton modules;
- **run time**: `check_args` (every argument, raising ValueError naming the bad one) and `fake`
  (output shapes for tracing);
- **tuning policy** (`Tuning`): how winners are timed, the knobs a deterministic build forces, the
  shape a batch-invariant build resolves at, the fields in which a neighbour's tuned entry answers;
- **gradient** (`Gradient`): the op that differentiates it and how, or where training goes instead.

Its workload (inputs, float64 reference, tolerances, check, naive baseline) lives apart, in
`<module>_workload.py` (dsagen.ops.workload): running a kernel never imports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..plan import Cost
from ..resources import data_dir
from .signature import Signature


@dataclass(frozen=True)
class Call:
    """One checked call of a kernel: its device and the (S, SKV) its schedule is looked up by."""

    device: torch.device
    S: int
    SKV: int


@dataclass(frozen=True)
class Tuning:
    """How a kernel is tuned and how a deterministic build runs it."""

    # how a winner is confirmed and recorded: "events" (CUDA events around eager calls, L2 flushed:
    # what `dsagen bench` reports) or "graph" (CUDA-graph replays: how a decode step runs, where
    # several short launches would otherwise be timed by their host launch cost)
    timing: str = "events"
    # knobs a deterministic build forces whatever else resolves the schedule (say, an output order
    # that does not depend on how the work was split)
    deterministic_knobs: Mapping[str, int] = field(default_factory=dict)
    # the call shape (rows, keys per row) at which a batch-invariant build resolves every call, so
    # one schedule serves every batch: a 4096-query prefill of a 32K context by default
    canonical_shape: tuple[int, int] = (4096, 32768)
    # semantic fields (positive integers) in which a tuned entry of another spec may differ and
    # still answer a lookup, nearest value first (an unseen head count gets the nearest tuned one)
    near_fields: tuple[str, ...] = ("heads",)


# a decode step's B * next_n = 256 rows of a 32K context
DECODE_TUNING = Tuning(canonical_shape=(256, 32768))


@dataclass(frozen=True)
class Where:
    """Where a kernel runs: a CUDA GPU of some compute capability (major, minor), or the CPU (the
    Triton interpreter, or TVM's llvm target)."""

    device_type: str  # "cuda" or "cpu"
    compute_capability: tuple[int, int] | None = None  # None on the CPU (and for a GPU not known)


@dataclass(frozen=True)
class Variant:
    """One algorithm of a kernel: its own template (`<template>.py.j2`) and search space
    (`<schedule>.toml`), and where it may run. A CUDA variant for one GPU generation names the
    compute capabilities it is written for; `interpreter` says whether the CPU rendering of the
    backend (the Triton interpreter, TVM's llvm target) runs it."""

    name: str | None  # None: the one algorithm of an op that declares none (never spelled out)
    template: str
    schedule: str
    backends: tuple[str, ...] = ("triton",)
    min_capability: tuple[int, int] | None = None  # None: any CUDA GPU
    max_capability: tuple[int, int] | None = None  # None: no upper bound
    interpreter: bool = True

    def may_run(self, where: Where) -> bool:
        """Whether this algorithm runs on `where` (a GPU whose capability is unknown runs only
        variants that ask for none)."""
        if where.device_type == "cpu":
            return self.interpreter
        cc = where.compute_capability
        if cc is None:
            return self.min_capability is None and self.max_capability is None
        return ((self.min_capability is None or cc >= self.min_capability)
                and (self.max_capability is None or cc <= self.max_capability))

    def requirement(self) -> str:
        """Where it runs, in words (for errors)."""
        low, high = self.min_capability, self.max_capability
        if low is None and high is None:
            gpus = "any CUDA GPU"
        elif low == high:
            gpus = f"CUDA GPUs of compute capability {low[0]}.{low[1]}"
        else:
            gpus = ("CUDA GPUs of compute capability" + (f" >= {low[0]}.{low[1]}" if low else "")
                    + (f" <= {high[0]}.{high[1]}" if high else ""))
        return gpus + (" and the CPU" if self.interpreter else " only")


@dataclass(frozen=True)
class Gradient:
    """The backward of a kernel: the registered op that differentiates it (None: none), the outputs
    that carry no gradient, the backward's arguments from this op's inputs, outputs and incoming
    gradients (by name), and which input each backward output belongs to. `hint`, where there is
    no backward: where training goes instead (said to a caller whose input requires grad)."""

    backward: str | None = None
    non_differentiable: tuple[str, ...] = ()
    # the backward's arguments: a tuple (positional), or a mapping by name (buffers included)
    backward_args: Callable[[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]],
                            tuple | Mapping[str, Any]] | None = None
    input_gradients: Callable[[tuple], dict[str, Any]] | None = None
    hint: str = ""

    @property
    def differentiable(self) -> bool:
        return self.backward is not None


class Op:
    """A kernel family. Subclasses set the class attributes and implement the methods below.

    Templates live in `<data_root>/templates/<backend>/<name>.py.j2` and search spaces in
    `<data_root>/schedules/<backend>/<name>.toml`; `data_root` defaults to dsagen's own data, and a
    kernel defined outside dsagen points it at its own folder.
    """

    name: str = ""
    summary: str = ""  # one line for `dsagen check` and the docs
    doc: str = ""  # the build method's docstring (help(kernels.<name>))
    # where the op is listed (check, generate, --kernel's help; stages() in this order is the
    # pipeline's): lower first, equal positions in the order they registered. dsagen's own ops hold
    # 10..110; a kernel that leaves it lists after them.
    position: int = 1000
    stage: bool = False  # one of the three DSA stages (the spec's default semantic hash uses them)
    needs_cache: bool = False  # a decode kernel: offered only by specs with a [cache] section

    # -- signature ----------------------------------------------------------------------------
    signature: Signature = Signature(())

    # -- specialization -------------------------------------------------------------------------
    backends: tuple[str, ...] = ("triton",)
    data_root: Path | None = None
    short_names: Mapping[str, str] = {}  # knob -> its spelling in Triton module names
    # the algorithms of this kernel, each its own template and search space; the first that may
    # run somewhere is the default there. None declared: one, named after the op.
    variants: tuple[Variant, ...] = ()

    def variants_for(self, backend: str) -> tuple[Variant, ...]:
        """The algorithms of `backend` (the op's own template and schedule where none are declared:
        that variant's name is None, and nothing spells it out)."""
        declared = tuple(v for v in self.variants if backend in v.backends)
        return declared or (Variant(None, self.name, self.name, (backend,)),)

    def variant(self, backend: str, name: str | None) -> Variant:
        """The variant called `name` on `backend` (None: the first); an unknown name is a ValueError
        listing the allowed ones."""
        variants = self.variants_for(backend)
        if name is None:
            return variants[0]
        for variant in variants:
            if variant.name == name:
                return variant
        allowed = ", ".join(str(v.name) for v in variants if v.name is not None) or "none"
        raise ValueError(f"variant={name!r} is not a {backend} variant of {self.name}: allowed {allowed}")

    def runnable_variants(self, backend: str, where: Where) -> tuple[Variant, ...]:
        """The variants of `backend` that may run on `where`, the default first."""
        return tuple(v for v in self.variants_for(backend) if v.may_run(where))

    def upgrade_schedule(self, schedule: Mapping[str, Any]) -> dict[str, Any]:
        """A schedule recorded by an older dsagen in today's form (say, an algorithm once chosen by
        a knob, now named by `variant`); identity unless an op changed its form."""
        return dict(schedule)

    def root(self, kind: str) -> Path:
        """The folder holding this op's `templates` or `schedules`."""
        return (self.data_root / kind) if self.data_root is not None else data_dir(kind)

    def semantic_fields(self, spec) -> dict[str, Any]:
        """The numbers this op's math depends on (hashed for the tuning database)."""
        raise NotImplementedError

    def template_fields(self, spec) -> dict[str, Any]:
        """Validated numbers and enum strings the template reads (never free text)."""
        return self.semantic_fields(spec)

    def module_stem(self, spec) -> str:
        """The start of the module's name: the op and its specialization."""
        fields = self.template_fields(spec)
        return self.name + "".join(f"_{k.replace('_', '')}{v}" for k, v in fields.items())

    def derived(self, spec, point: Mapping[str, int], backend: str) -> dict[str, Any]:
        """Sizes a template needs beyond the spec and the schedule (padded tile shapes)."""
        return {}

    def problem_symbols(self, spec) -> dict[str, int]:
        """The numbers this op's schedule footprints and constraints are written in."""
        return {}

    def cost(self, spec) -> Cost:
        raise NotImplementedError

    def enabled(self, spec, backend: str) -> bool:
        """Whether a build of `spec` on `backend` offers this kernel."""
        return self.unavailable(spec, backend) is None

    def unavailable(self, spec, backend: str) -> str | None:
        """Why a build of `spec` on `backend` does not offer this kernel (said to a user who calls
        it anyway), or None where it does. An op with its own conditions extends this."""
        if backend not in self.backends:
            return f"{self.name} has no {backend} template (its backends: {', '.join(self.backends)})"
        if self.needs_cache and spec.cache is None:
            return f"{self.name} is a decode kernel: it needs a spec with a [cache] section"
        return None

    # -- run time ---------------------------------------------------------------------------
    def check_args(self, spec, **arguments) -> Call:
        """Check every argument and given output buffer (by name: dtype, shape, device, strides),
        raising ValueError naming the bad one; return the device and the (S, SKV) its schedule is
        chosen by."""
        raise NotImplementedError

    def fake(self, spec, **inputs):
        """Outputs of the right shape, dtype and device without running (torch.compile's tracing;
        the buffers a call allocates)."""
        raise NotImplementedError

    # -- tuning policy and gradient ---------------------------------------------------------------
    tuning: Tuning = Tuning()
    gradient: Gradient = Gradient()

    def __repr__(self) -> str:
        return f"<dsagen op {self.name} ({', '.join(self.backends)})>"
