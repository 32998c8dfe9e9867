"""Registers, spills and shared memory of generated Triton kernels for sm_90, without a GPU.

    python benchmarks/ptxas_report.py indexer_topk --schedule '{"block_m": 16, "block_h": 1}' [--schedule ...]

Each schedule (JSON object of knobs; none = the resolved default) is rendered, compiled for sm_90
by Triton with 16-byte aligned pointers and strides (as a launch on V3.2 shapes specializes them),
and its PTX assembled again by Triton's own ptxas with -v. Spills are the first thing to look at
before spending GPU time on a variant.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

import dsagen  # noqa: E402
from dsagen.backends import triton as triton_backend  # noqa: E402
from dsagen.kernels import resolve_kernel  # noqa: E402
from dsagen.ops import names as kernel_names  # noqa: E402


def ptxas_lines(ptx: str) -> list[str]:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        done = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(path), "-o", os.devnull],
                              capture_output=True, text=True, check=True)
    return [line.split(":", 1)[-1].strip() for line in done.stderr.splitlines()
            if "registers" in line or "spill" in line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", choices=list(kernel_names()))
    ap.add_argument("--spec", type=Path, default=Path(__file__).resolve().parents[1] / "specs" / "deepseek_v32.toml")
    ap.add_argument("--schedule", type=json.loads, action="append", default=None,
                    help="JSON object of knobs (repeatable); default: the resolved schedule")
    args = ap.parse_args()
    spec = dsagen.load_spec(args.spec)
    for override in args.schedule or [None]:
        src = resolve_kernel(spec, args.kernel, "triton", "nvidia-h200", override)
        module = triton_backend.load(triton_backend.materialize(src.generated), interpret=False)
        for compiled in triton_backend.compile_for(module, arch=90, aligned_strides=True):
            print(f"{compiled.metadata.name} {override or 'default'}: shared {compiled.metadata.shared} B; "
                  + "; ".join(ptxas_lines(compiled.asm["ptx"])), flush=True)


if __name__ == "__main__":
    main()
