"""Argument checks of the drop-in entry points, in the caller's words.

Every error names the compat function and the parameter the caller passed (or the expression
of it that is at fault, as `q.shape[2]`), never a spec field or a kernel's own argument name,
and is raised before anything is built or launched. A value of the wrong Python type raises
TypeError (as the peers' bindings do); a tensor of the wrong dtype, shape or device, or a number
out of range, raises ValueError.
"""
from __future__ import annotations

import numbers
import operator
from typing import Any, Mapping

import torch

from ..ops.checks import check_scale, check_tensor


def describe(value: Any) -> str:
    """A short description of a value for an error message (a tensor by its dtype and shape)."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else type(value).__name__


def host_int(value: Any) -> int | None:
    """value as a Python int, or None where it is not an integer: Python ints, NumPy integers and
    0-d integer tensors (read with .item(), a host sync: the peers take these as host ints), never
    a bool."""
    if isinstance(value, torch.Tensor):
        dtype = value.dtype
        if value.dim() != 0 or dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
            return None
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return operator.index(value)


class Args:
    """The checks of one compat function's arguments; each error starts with its name."""

    def __init__(self, fn: str):
        self.fn = fn

    def fail(self, message: str, kind: type[Exception] = ValueError) -> Exception:
        """The error to raise, its message prefixed with the function's name."""
        return kind(f"{self.fn}: {message}")

    def tensor(self, name: str, t: Any, dtype: torch.dtype, layout: str, shape: tuple,
               device: torch.device | None = None, contiguous_last: bool = True) -> torch.Tensor:
        """t, unless it is not a tensor of `dtype` and `shape` (None: any size) on `device` (with a
        unit last stride unless the function copies it); `layout` says the shape in the caller's
        symbols ("[M, H] fp32")."""
        if not isinstance(t, torch.Tensor):
            raise self.fail(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}", TypeError)
        try:
            check_tensor(name, t, dtype, shape, device, contiguous_last)
        except ValueError as exc:
            raise self.fail(f"{exc} ({name} is {layout})") from None
        return t

    def optional_tensor(self, name: str, t: Any, what: str) -> None:
        """A tensor the call accepts and does not read (None allowed)."""
        if t is not None and not isinstance(t, torch.Tensor):
            raise self.fail(f"{name} must be None or a torch.Tensor ({what}), got {type(t).__name__}", TypeError)

    def integer(self, name: str, value: Any, minimum: int) -> int:
        """value as an int >= minimum (0 or 1); see host_int."""
        kind = "a positive" if minimum == 1 else "a non-negative"
        number = host_int(value)
        if number is None:
            raise self.fail(f"{name} must be {kind} int (a Python or NumPy integer, or a 0-d integer tensor), "
                            f"got {describe(value)}", TypeError)
        if number < minimum:
            raise self.fail(f"{name} must be {kind} int, got {number}")
        return number

    def flag(self, name: str, value: Any) -> bool:
        """A bool parameter of the peers: True or False only (no 0/1 or None standing in for one)."""
        if not isinstance(value, bool):
            raise self.fail(f"{name} must be True or False, got {describe(value)}", TypeError)
        return value

    def scale(self, name: str, value: Any) -> float | None:
        """A softmax scale (None: the default, q.shape[-1] ** -0.5) as a float."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.fail(f"{name} must be a finite number > 0 or None, got {describe(value)}", TypeError)
        try:
            return check_scale(name, value)
        except ValueError as exc:
            raise self.fail(str(exc)) from None

    def at_least_one(self, what: str, value: int) -> None:
        """A size the kernels need at least one of (heads, query tokens)."""
        if value < 1:
            raise self.fail(f"{what} must be >= 1, got {value}")

    def no_grad_needed(self, tensors: Mapping[str, Any]) -> None:
        """Refuse inputs that require grad where autograd records: the peers have no backward, so
        the results would silently carry no gradient."""
        if not torch.is_grad_enabled():
            return
        needing = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
        if needing:
            verb = "requires" if len(needing) == 1 else "require"
            raise RuntimeError(f"{self.fn} has no backward, but {' and '.join(needing)} {verb} grad: call it under "
                               "torch.no_grad() or pass tensors that do not require grad (.detach())")
