"""`dsagen check | generate | show | explain`: what a build of a spec would run, without running it.

All four ask the one resolver (dsagen.resolve) that `dsagen.build` uses, at a shape (--S/--SKV), a
GPU type (--gpu) and a device (--device), so they print exactly the schedule and module a build
runs there, and where that schedule came from (tuned entry, pinned knobs, defaults).
"""
from __future__ import annotations

from pathlib import Path

import typer

from .errors import friendly_errors, printable
from .options import (BACKEND_OPTION, GPU_OPTION, SPEC_ARGUMENT, TARGET_DEVICE_OPTION, Backend, Device, Window,
                      check_shape, kernel_names, load_checked_spec, resolver_for)

S_OPTION = typer.Option(4096, "--S", min=1, help="query tokens (rows of the indexer logits)")
SKV_OPTION = typer.Option(32768, "--SKV", min=1, help="key/value tokens")


def _resolve_all(spec_path: Path, backend: Backend, gpu: str | None, S: int, SKV: int, device: Device):
    """(spec, resolver, one Resolved per kernel the spec enables), every kernel resolved before
    anything is printed, so an error comes alone."""
    from dsagen.ops import enabled

    from dsagen.codegen import generate
    from dsagen.kernels import ResolvedModule

    spec = load_checked_spec(spec_path, backend.value)
    resolver = resolver_for(spec, backend, gpu)
    schedules = [(op, resolver.resolve(op, S, SKV, device.value)) for op in enabled(spec, backend.value)]
    return spec, resolver, [ResolvedModule(s, generate(spec, op, s, backend.value)) for op, s in schedules]


def _note_assumed_gpu(resolver, gpu: str | None, device: Device) -> None:
    """Without a GPU and without --gpu, the CUDA schedules shown are those of the default GPU type,
    not of this machine: say so on stderr, once nothing can fail any more (so an error comes alone)."""
    from dsagen.resolve import detected_gpu

    if gpu is None and device == Device.cuda and detected_gpu() is None:
        typer.echo(f"note: no GPU seen: showing the schedules a build on {resolver.gpu_type} would run; pass "
                   "--gpu TYPE for another GPU type, or --device cpu for this machine's", err=True)


def _where(resolver, device: Device) -> str:
    db = resolver.db_type(device.value)
    if device == Device.cpu and resolver.backend == "triton":
        return "the CPU (Triton interpreter: pinned knobs and defaults)"
    return f"{db} (tuning database)" if db else "no tuning database"


def check(
    spec_path: Path = SPEC_ARGUMENT,
    S: int = typer.Option(4096, "--S", min=1, help="query tokens (rows of the indexer logits)"),
    SKV: int = typer.Option(8192, "--SKV", min=1, help="key/value tokens"),
    gpu: str = GPU_OPTION,
    window: Window = typer.Option(Window.causal, "--window",
                                  help="indexer key windows: 'full' rows or 'causal' (queries are the last S keys)"),
    backend: Backend = BACKEND_OPTION,
    device: Device = TARGET_DEVICE_OPTION,
) -> None:
    """Validate SPEC and print each kernel's cost, roofline floor and schedule.

    Per kernel the spec enables on --backend: FLOPs and bytes (symbolic and at --S/--SKV), the
    roofline floor on the GPU type, the schedule a build would use at that shape and where it came
    from, its footprint and its legality constraints.
    """
    from dsagen.ops import get_op, semantic_hash
    from dsagen.plan import causal_window_mean, problem_symbols
    from dsagen.schedule import load_space

    check_shape(S, SKV)
    spec, resolver, hits = _resolve_all(spec_path, backend, gpu, S, SKV, device)
    _note_assumed_gpu(resolver, gpu, device)
    target = resolver.plan_gpu
    w = causal_window_mean(S, SKV) if window == Window.causal else SKV
    sizes = {"S": S, "SKV": SKV, "W": w}
    typer.echo(f"spec {printable(str(spec_path))}: valid (semantic hash {semantic_hash(spec)}), "
               f"name {printable(spec.name)!s}")
    typer.echo(f"  indexer   heads={spec.indexer.heads} head_dim={spec.indexer.head_dim} dtype={spec.indexer.dtype}")
    typer.echo(f"  topk      k={spec.topk.k}" + (" (fused with the indexer in dsa())" if spec.topk.fused else ""))
    at = spec.attention
    typer.echo(f"  attention heads={at.heads} qk_dim={at.qk_dim} v_dim={at.v_dim} dtype={at.dtype} "
               f"sm_scale={at.softmax_scale:.6g}{'' if at.sm_scale is not None else ' (default qk_dim**-0.5)'}")
    typer.echo(f"problem: S={S} SKV={SKV} mean indexer window W={w:g} ({window.value}); GPU {target.name} "
               f"({target.source}); schedules for {device.value} from {_where(resolver, device)}")
    typer.echo(f"kernels ({backend.value}): {', '.join(hit.kernel for hit in hits)}")
    for hit in hits:
        kernel, op = hit.kernel, get_op(hit.kernel)
        c = op.cost(spec)
        flops, nbytes = c.evaluate(sizes)
        floor, bound = c.floor_ms(sizes, target)
        typer.echo(f"\n[{kernel}]  {op.summary}")
        typer.echo(f"  FLOPs  = {c.flops}  -> {flops:.4g}")
        typer.echo(f"  bytes >= {c.bytes}  -> {nbytes:.4g}")
        typer.echo(f"  roofline floor on {target.name}: {floor:.4f} ms ({bound}-bound)")
        space = load_space(backend.value, op, hit.variant)
        problem = problem_symbols(spec, op, target)
        if hit.variant is not None:
            typer.echo(f"  variant: {hit.variant}")
        typer.echo(f"  schedule: {hit.point}")
        typer.echo(f"  from: {hit.source}")
        typer.echo(f"  module: {hit.module_name}")
        if space.footprint:
            fp = space.footprint_of(hit.point, problem)
            typer.echo("  footprint: " + ", ".join(f"{k}={v:g}" for k, v in fp.items())
                       + f" (smem limit {target.smem_per_block})")
        broken = space.violations(hit.point, problem)
        for name, expr in space.constraints.items():
            status = "ok" if not any(b.startswith(name + " ") for b in broken) else "VIOLATED"
            typer.echo(f"  constraint {name}: {expr}  [{status}]")
        typer.echo(f"  legal points in the search space: {len(space.legal_points(problem))} of {len(space.grid())}")


def generate(
    spec_path: Path = SPEC_ARGUMENT,
    out: Path = typer.Option(..., "-o", "--out", help="directory to write the generated modules into"),
    S: int = S_OPTION,
    SKV: int = SKV_OPTION,
    gpu: str = GPU_OPTION,
    backend: Backend = BACKEND_OPTION,
    device: Device = TARGET_DEVICE_OPTION,
) -> None:
    """Write the generated module of every kernel SPEC enables into --out (each importable alone),
    with the schedules a build would use at --S/--SKV on --gpu/--device."""
    from dsagen.fileio import atomic_write_text

    _, resolver, hits = _resolve_all(spec_path, backend, gpu, S, SKV, device)
    _make_output_folder(out)
    _note_assumed_gpu(resolver, gpu, device)
    for hit in hits:
        path = out / f"{hit.module_name}.py"
        atomic_write_text(path, hit.generated.source)
        typer.echo(f"{hit.kernel}: {path}  (schedule {hit.schedule.schedule_mapping()}, from {hit.source})")


def _make_output_folder(out: Path) -> None:
    """Create -o's folder (and its parents); a file in the way is an error naming -o."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"-o/--out {printable(str(out))}: is a file, not a folder: give a folder to write the "
                         "generated modules into") from None
    except OSError as exc:
        raise ValueError(f"-o/--out {printable(str(out))}: cannot create the folder: {exc.strerror or exc}") from None


def show(
    spec_path: Path = SPEC_ARGUMENT,
    kernel: str = typer.Option(..., "--kernel", "-k", help="which kernel to print (any kernel `dsagen check` lists)"),
    S: int = S_OPTION,
    SKV: int = SKV_OPTION,
    gpu: str = GPU_OPTION,
    backend: Backend = BACKEND_OPTION,
    device: Device = TARGET_DEVICE_OPTION,
) -> None:
    """Print the generated source of one kernel of SPEC as a build would run it at --S/--SKV
    (where its schedule came from goes to stderr, so stdout is the module alone)."""
    spec = load_checked_spec(spec_path, backend.value)
    name = kernel_names([kernel], spec=spec, backend=backend.value)[0]
    resolver = resolver_for(spec, backend, gpu)
    from dsagen.codegen import generate
    from dsagen.ops import get_op

    op = get_op(name)
    hit = resolver.resolve(op, S, SKV, device.value)
    source = generate(spec, op, hit, backend.value).source
    _note_assumed_gpu(resolver, gpu, device)
    typer.echo(f"# {name} at S={S} SKV={SKV}: schedule {hit.schedule_mapping()}, from {hit.source}", err=True)
    typer.echo(source, nl=False)


def explain(
    spec_path: Path = SPEC_ARGUMENT,
    S: int = S_OPTION,
    SKV: int = SKV_OPTION,
    gpu: str = GPU_OPTION,
    backend: Backend = BACKEND_OPTION,
    device: Device = TARGET_DEVICE_OPTION,
) -> None:
    """Say which schedule each kernel of SPEC uses at (S, SKV), and where it comes from.

    Sources, in order: the tuning database (exact or nearest shape bucket, or another GPU type of
    the same compute capability), the spec's pinned knobs, the search space's defaults, and the
    nearest legal point when a default does not fit the spec.
    """
    spec, resolver, hits = _resolve_all(spec_path, backend, gpu, S, SKV, device)
    _note_assumed_gpu(resolver, gpu, device)
    typer.echo(f"{printable(spec.name)} ({backend.value}) at S={S} SKV={SKV} on {device.value}: "
               f"{_where(resolver, device)}")
    for hit in hits:
        sched = " ".join(f"{k}={v}" for k, v in hit.schedule.schedule_mapping().items())
        typer.echo(f"  {hit.kernel:<17} {sched}\n  {'':<17} from: {hit.source}\n  {'':<17} module: {hit.module_name}")
        if hit.stale:
            typer.echo(f"  {'':<17} stale: {'; '.join(hit.stale)}")


def register(app: typer.Typer) -> None:
    for fn in (check, generate, show, explain):
        app.command(name=fn.__name__)(friendly_errors(fn))
