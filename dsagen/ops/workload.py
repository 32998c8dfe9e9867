"""The workload part of a kernel: what tests, `dsagen tune` and `dsagen bench` run it on and check
it against. It lives apart from the op (in `<op module>_workload.py` beside it), so running a
kernel never imports it.

A workload declares its inputs at a shape (S, SKV), its float64 reference, the tolerances its
check holds each output to, output buffers poisoned with values no kernel writes, the check, the
naive PyTorch baseline and how `dsagen bench` reports the shape.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import DsagenError
from ..fileio import import_file


class Workload:
    """One kernel's workload; `kernel` names the op it belongs to."""

    kernel: str = ""
    naive_name: str = "naive PyTorch"
    # the RMS-ratio bound ||got - ref|| / ||ref|| of each checked output against the float64
    # reference (verify.assert_close), keyed by what is checked (an output's name), with ".<dtype>"
    # where the bound depends on one
    tolerances: Mapping[str, float] = {}

    def tolerance(self, output: str) -> float:
        """The bound `output` is checked to; an undeclared one is an error naming what is declared."""
        if output not in self.tolerances:
            declared = ", ".join(self.tolerances) or "none"
            raise DsagenError(f"op {self.kernel!r} declares no tolerance for {output!r} (declared: {declared})")
        return self.tolerances[output]

    def inputs(self, spec, S_: int, SKV_: int, device, seed: int) -> tuple:
        """Inputs at (S, SKV): the kernel's arguments in signature order (spec defaults filled in)."""
        raise NotImplementedError

    def reference(self, spec, *args):
        """The float64 result written from the math."""
        raise NotImplementedError

    def poisoned_outputs(self, spec, inputs) -> dict[str, torch.Tensor]:
        """Output buffers filled with values no kernel writes (NaN, -7), by output name."""
        raise NotImplementedError

    def check(self, spec, inputs, result, rows: torch.Tensor) -> str:
        """Raise verify.Mismatch if `result` is wrong on `rows`; else say what was checked."""
        raise NotImplementedError

    def naive(self, spec, inputs) -> Callable[[], object]:
        """A zero-argument callable running naive PyTorch on `inputs` (the speed-up baseline)."""
        raise NotImplementedError

    def shape_info(self, spec, S_: int, SKV_: int) -> dict[str, Any]:
        """The shape as `dsagen bench` reports it."""
        return {"S": S_, "SKV": SKV_}

    def call_shape(self, S_: int, SKV_: int) -> tuple[int, int]:
        """The (S, SKV) that `check_args` reports for the workload at (S_, SKV_): what the tuning
        database buckets a tuned entry by, so that a build looks it up where it was recorded."""
        return S_, SKV_

    def sizes(self, S_: int, SKV_: int) -> dict[str, float]:
        """The cost model's symbols at a workload's shape (its mean window for W)."""
        return {"S": S_, "SKV": SKV_, "W": SKV_}

    def bench_warning(self, spec, S_: int, SKV_: int) -> str | None:
        """Why a benchmark at this shape would mislead, or None."""
        return None


def workload_of(op) -> Workload:
    """The workload of `op`: the Workload for its name in the module `<op's module>_workload`
    (for an op defined in a file, the file `<stem>_workload.py` beside it)."""
    module = _workload_module(type(op).__module__)
    found = [w for w in vars(module).values() if isinstance(w, Workload) and w.kernel == op.name]
    if not found:
        raise DsagenError(f"op {op.name!r}: {module.__name__} defines no Workload with kernel = {op.name!r}")
    return found[0]


def _workload_module(op_module: str):
    name = f"{op_module}_workload"
    if name in sys.modules:
        return sys.modules[name]
    owner = sys.modules.get(op_module)
    path = Path(getattr(owner, "__file__", "") or "")
    if "." in op_module:  # a module of a package: import it by name
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            raise DsagenError(f"op module {op_module} has no workload module {name}") from None
    file = path.with_name(f"{path.stem}_workload.py")
    if not file.is_file():
        raise DsagenError(f"op module {op_module} ({path}) has no workload file {file.name} beside it")
    return import_file(file, name)


# -- helpers the workloads share ---------------------------------------------------------------

def generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def causal_windows(S_: int, SKV_: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ks = 0, ke[t] = SKV - S + t + 1: query t sees itself and everything before it."""
    ks = torch.zeros(S_, dtype=torch.int32, device=device)
    ke = torch.arange(SKV_ - S_ + 1, SKV_ + 1, dtype=torch.int32, device=device)
    return ks, ke


def causal_topk_indices(S_: int, SKV_: int, k: int, device, g) -> torch.Tensor:
    """Per query (the last S_ positions of a causal context), k random distinct keys of its window,
    padded with the invalid index SKV_ where the window is shorter (the sparse attention's inputs)."""
    pos = torch.arange(SKV_ - S_, SKV_, device=device)
    keys = torch.rand(S_, SKV_, device=device, generator=g)
    keys = keys.masked_fill(torch.arange(SKV_, device=device)[None, :] > pos[:, None], -1.0)
    vals, idx = keys.topk(min(k, SKV_), dim=1)
    idx = torch.where(vals >= 0, idx, SKV_).int()
    if k > SKV_:
        idx = torch.cat([idx, torch.full((S_, k - SKV_), SKV_, dtype=torch.int32, device=device)], 1)
    return idx.contiguous()


def few_keys_warning(spec, SKV_: int) -> str | None:
    """A top-k benchmark where every key is selected measures padding, not selection."""
    k = spec.topk.k
    if SKV_ <= k:
        return (f"SKV={SKV_} <= k={k}: every key of a row is selected, so the kernel only pads with -1 and "
                "the speed-up over torch.topk says nothing about selection")
    return None
