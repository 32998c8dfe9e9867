"""GPU types dsagen knows: the ceilings that roofline floors are computed from.

The H200 numbers were measured on an H200 on 2026-11-28 (torch 2.11, triton 3.6): a device-to-device
copy, a bf16 matmul and a torch._scaled_mm fp8 matmul. The others are vendor datasheet figures
(dense, SXM parts).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str  # the GPU type, also the tuning-database file stem
    compute_capability: tuple[int, int]
    smem_per_block: int  # bytes of shared memory one program may use
    bf16_tflops: float
    fp8_tflops: float | None
    bandwidth_tbps: float
    source: str


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("nvidia-h200", (9, 0), 232448, 756.0, 1328.6, 4.159,
            "measured on an H200, 2026-11-28 (copy, bf16 mm, fp8 _scaled_mm)"),
        GPU("nvidia-h100", (9, 0), 232448, 989.0, 1979.0, 3.35, "NVIDIA H100 SXM datasheet"),
        GPU("nvidia-a100", (8, 0), 166912, 312.0, None, 2.039, "NVIDIA A100 80GB SXM datasheet"),
    )
}


def get_gpu(name: str) -> GPU:
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}: known GPUs are {', '.join(GPUS)}") from None


def gpu_type_from_device_name(device_name: str) -> str:
    """Map torch.cuda.get_device_name() to a GPU type: 'NVIDIA H200' -> 'nvidia-h200'."""
    text = device_name.lower().replace("nvidia", "").strip()
    for token in ("h200", "h100", "a100", "h20", "h800", "b200", "l40s", "a10g"):
        if token in text.split() or text.startswith(token):
            return f"nvidia-{token}"
    slug = "-".join(part for part in text.replace("_", " ").split() if part.isalnum())
    return f"nvidia-{slug or 'unknown'}"


def cpu_type() -> str:
    """The tuning-database name of this CPU type for CPU backends: cpu-<machine>, e.g. cpu-x86_64."""
    import platform

    machine = (platform.machine() or "unknown").lower().replace("_", "-").replace("amd64", "x86-64")
    return f"cpu-{machine}"


def cpu_model() -> str:
    """This CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
