"""Argument checks every op's `check_args` is written with: each raises ValueError naming the
argument and what is allowed."""
from __future__ import annotations

import torch

from ..spec import softmax_scale_value


def check_tensor(name: str, t, dtype, shape: tuple, device: torch.device | None = None,
                 contiguous_last: bool = True) -> None:
    """Raise ValueError naming `name` unless t is a tensor of `dtype` and `shape` (None: any size)
    on `device`, with a unit stride in its last dimension."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, but the other inputs are on {device}")
    if t.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name} is on {t.device}: dsagen runs on cuda (compiled) or cpu (interpreted)")
    if contiguous_last and t.numel() > 0 and t.dim() > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got strides {t.stride()}")


def check_out(name: str, t, dtype, shape: tuple, device) -> None:
    """An optional output buffer: None, or a tensor exactly as the kernel would allocate it."""
    if t is not None:
        check_tensor(name, t, dtype, shape, device)


def check_scale(name: str, value) -> float:
    """A run-time softmax scale as a float, or ValueError naming `name` and what is allowed."""
    number, problem = softmax_scale_value(value)
    if problem:
        raise ValueError(f"{name}={value!r} {problem}")
    return number


def softmax_scale(spec, sm_scale) -> float:
    """The run-time scale given (checked, as a plain float), else the spec's: what every attention
    op computes with (the `from_spec` of their sm_scale argument)."""
    return spec.attention.softmax_scale if sm_scale is None else check_scale("sm_scale", sm_scale)
