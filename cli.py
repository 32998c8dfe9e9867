"""The `dsagen` command: a thin typer layer over the dsagen API (parse, call, print).

Errors print one line and exit with status 1 (2 for bad command-line usage), never a traceback.
"""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from dsagen.cliutil import friendly_errors

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="dsagen: compile a DeepSeek Sparse Attention spec (TOML) into tuned Triton kernels.",
)

KERNEL_NAMES = ("indexer", "topk", "sparse_attention")


class Kernel(str, Enum):
    indexer = "indexer"
    topk = "topk"
    sparse_attention = "sparse_attention"


class Window(str, Enum):
    full = "full"
    causal = "causal"


def _load(spec_path: Path):
    from dsagen import load_spec

    return load_spec(spec_path)


@app.command()
@friendly_errors
def check(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="TOML spec file"),
    S: int = typer.Option(4096, "--S", min=1, help="query tokens (rows of the indexer logits)"),
    SKV: int = typer.Option(8192, "--SKV", min=1, help="key/value tokens"),
    gpu: str = typer.Option("nvidia-h200", "--gpu", help="GPU type for shared memory and the roofline floor"),
    window: Window = typer.Option(Window.causal, "--window",
                                  help="indexer key windows: 'full' rows or 'causal' (queries are the last S keys)"),
) -> None:
    """Validate SPEC and print, per kernel, FLOPs and bytes (symbolic and at --S/--SKV), the roofline
    floor on --gpu, the schedule a build would use, its footprint and its legality constraints."""
    from dsagen.gpus import get_gpu
    from dsagen.plan import causal_window_mean, cost, problem_symbols
    from dsagen.schedule import choose, load_space

    spec = _load(spec_path)
    target = get_gpu(gpu)
    choices = {kernel: choose(spec, kernel, target) for kernel in KERNEL_NAMES}  # fail before printing
    w = causal_window_mean(min(S, SKV), SKV) if window == Window.causal else SKV
    sizes = {"S": S, "SKV": SKV, "W": w}
    typer.echo(f"spec {spec_path}: valid (semantic hash {spec.semantic_hash()})")
    typer.echo(f"  indexer   heads={spec.indexer.heads} head_dim={spec.indexer.head_dim} dtype={spec.indexer.dtype}")
    typer.echo(f"  topk      k={spec.topk.k}")
    at = spec.attention
    typer.echo(f"  attention heads={at.heads} qk_dim={at.qk_dim} v_dim={at.v_dim} dtype={at.dtype} "
               f"sm_scale={at.softmax_scale:.6g}{'' if at.sm_scale is not None else ' (default qk_dim**-0.5)'}")
    typer.echo(f"problem: S={S} SKV={SKV} mean indexer window W={w:g} ({window.value}); GPU {target.name} "
               f"({target.source})")
    for kernel in KERNEL_NAMES:
        c = cost(spec, kernel)
        flops, nbytes = c.evaluate(sizes)
        floor, bound = c.floor_ms(sizes, target)
        typer.echo(f"\n[{kernel}]")
        typer.echo(f"  FLOPs  = {c.flops}  -> {flops:.4g}")
        typer.echo(f"  bytes >= {c.bytes}  -> {nbytes:.4g}")
        typer.echo(f"  roofline floor on {target.name}: {floor:.4f} ms ({bound}-bound)")
        choice = choices[kernel]
        space = load_space("triton", kernel)
        problem = problem_symbols(spec, kernel, target)
        fp = space.footprint_of(choice.point, problem)
        typer.echo(f"  schedule ({choice.source}): {choice.point}")
        typer.echo("  footprint: " + ", ".join(f"{k}={v:g}" for k, v in fp.items())
                   + f" (smem limit {target.smem_per_block})")
        broken = space.violations(choice.point, problem)
        for name, expr in space.constraints.items():
            status = "ok" if not any(b.startswith(name + " ") for b in broken) else "VIOLATED"
            typer.echo(f"  constraint {name}: {expr}  [{status}]")
        typer.echo(f"  legal points in the search space: {len(space.legal_points(problem))} of {len(space.grid())}")


@app.command()
@friendly_errors
def generate(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="TOML spec file"),
    out: Path = typer.Option(..., "-o", "--out", help="directory to write the generated modules into"),
    gpu: str = typer.Option("nvidia-h200", "--gpu", help="GPU type the schedules are chosen for"),
) -> None:
    """Write the generated Triton module of every kernel of SPEC into --out (each importable alone)."""
    from dsagen.fileio import atomic_write_text
    from dsagen.pipeline import all_sources

    spec = _load(spec_path)
    out.mkdir(parents=True, exist_ok=True)
    for kernel, src in all_sources(spec, "triton", gpu).items():
        path = out / f"{src.generated.module_name}.py"
        atomic_write_text(path, src.generated.source)
        typer.echo(f"{kernel}: {path}  (schedule {src.choice.point}, {src.choice.source})")


@app.command()
@friendly_errors
def show(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="TOML spec file"),
    kernel: Kernel = typer.Option(..., "--kernel", "-k", help="which kernel to print"),
    gpu: str = typer.Option("nvidia-h200", "--gpu", help="GPU type the schedule is chosen for"),
) -> None:
    """Print the generated Triton source of one kernel of SPEC."""
    from dsagen.pipeline import kernel_source

    spec = _load(spec_path)
    typer.echo(kernel_source(spec, kernel.value, "triton", gpu).generated.source, nl=False)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
