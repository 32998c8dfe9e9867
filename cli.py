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
    indexer_topk = "indexer_topk"  # fused indexer + top-k (Triton)


class Backend(str, Enum):
    triton = "triton"
    tvm = "tvm"


BACKEND_OPTION = typer.Option(Backend.triton, "--backend", "-b", help="kernel backend: triton or tvm")


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
    backend: Backend = BACKEND_OPTION,
) -> None:
    """Validate SPEC and print each kernel's cost, roofline floor and schedule.

    Per kernel: FLOPs and bytes (symbolic and at --S/--SKV), the roofline floor on --gpu, the
    schedule a build would use, its footprint and its legality constraints.
    """
    from dsagen.gpus import get_gpu
    from dsagen.plan import causal_window_mean, cost, problem_symbols
    from dsagen.schedule import choose, load_space

    spec = _load(spec_path)
    target = get_gpu(gpu)
    choices = {kernel: choose(spec, kernel, target, backend.value) for kernel in KERNEL_NAMES}  # fail before printing
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
        space = load_space(backend.value, kernel)
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
    backend: Backend = BACKEND_OPTION,
) -> None:
    """Write the generated module of every kernel of SPEC into --out (each importable alone)."""
    from dsagen.fileio import atomic_write_text
    from dsagen.pipeline import all_sources

    spec = _load(spec_path)
    out.mkdir(parents=True, exist_ok=True)
    for kernel, src in all_sources(spec, backend.value, gpu).items():
        path = out / f"{src.generated.module_name}.py"
        atomic_write_text(path, src.generated.source)
        typer.echo(f"{kernel}: {path}  (schedule {src.choice.point}, {src.choice.source})")


@app.command()
@friendly_errors
def show(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="TOML spec file"),
    kernel: Kernel = typer.Option(..., "--kernel", "-k", help="which kernel to print"),
    gpu: str = typer.Option("nvidia-h200", "--gpu", help="GPU type the schedule is chosen for"),
    backend: Backend = BACKEND_OPTION,
) -> None:
    """Print the generated source of one kernel of SPEC."""
    from dsagen.pipeline import kernel_source

    spec = _load(spec_path)
    typer.echo(kernel_source(spec, kernel.value, backend.value, gpu).generated.source, nl=False)


# ------------------------------------------------------------------------------------------------
# tuning, the tuning database, benchmarks

def _shapes(S: list[int] | None, SKV: list[int] | None, shape_set: str | None) -> list[tuple[int, int]]:
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


def _kernels(kernel: list[Kernel] | None) -> list[str]:
    return [k.value for k in kernel] if kernel else list(KERNEL_NAMES)


class Sampler(str, Enum):
    auto = "auto"
    grid = "grid"
    tpe = "tpe"


class TuneDevice(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


def _device_for(command: str, backend: Backend, device: TuneDevice | None, cpu_hint: str) -> TuneDevice:
    """--device, by default cuda when torch sees a GPU (always for Triton, whose CPU path is only an
    interpreter), else cpu; cuda without a GPU is an error that says what to do instead."""
    import torch

    if device is None:
        device = TuneDevice.cuda if torch.cuda.is_available() or backend == Backend.triton else TuneDevice.cpu
    if device == TuneDevice.cuda and not torch.cuda.is_available():
        raise ValueError(f"dsagen {command} --backend {backend.value} --device cuda needs a CUDA GPU, and torch "
                         f"sees none ({cpu_hint})")
    return device


def _spawn_device_workers(devices: str) -> int:
    """--devices 0,1,...: one `dsagen tune` per GPU (CUDA_VISIBLE_DEVICES), all on the same studies."""
    import os
    import subprocess

    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not ids or not all(d.isdigit() for d in ids):
        raise ValueError(f"--devices {devices!r}: give GPU ordinals separated by commas, e.g. 0,1,2,3")
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--devices":
            skip = True
            continue
        if arg.startswith("--devices="):
            continue
        argv.append(arg)
    procs = []
    for d in ids:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": d}
        typer.echo(f"starting a tuning worker on GPU {d}", err=True)
        procs.append(subprocess.Popen([sys.executable, "-m", "cli", *argv], env=env))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        codes = [p.wait() for p in procs]  # each got the Ctrl-C too and stops cleanly
    return max(codes)


@app.command()
@friendly_errors
def tune(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="TOML spec file"),
    kernel: list[Kernel] = typer.Option(None, "--kernel", "-k", help="kernel to tune (repeatable; default all three)"),
    S: list[int] = typer.Option(None, "--S", min=1, help="query tokens (repeatable)"),
    SKV: list[int] = typer.Option(None, "--SKV", min=1, help="context tokens (repeatable)"),
    shapes: str = typer.Option(None, "--shapes", help="a named shape set instead of --S/--SKV: v32 (S 1024, 4096 x "
                               "SKV 8192, 32768, 131072) or smoke"),
    trials: int = typer.Option(None, "--trials", min=1, help="candidates per study, all workers together "
                               "(default: the whole legal grid when it is small, else 30% of it with TPE)"),
    timeout: float = typer.Option(None, "--timeout", min=1, help="seconds this process spends on one study at most"),
    trial_timeout: float = typer.Option(180.0, "--trial-timeout", min=1,
                                        help="seconds one candidate may take (compile + check + time) before it "
                                        "is killed"),
    storage: str = typer.Option(None, "--storage", help="Optuna storage: a *.journal file or a database URL "
                                "(postgresql://user:pw@host/db) shared by many workers; default a journal file "
                                "in the user cache"),
    sampler: Sampler = typer.Option(Sampler.auto, "--sampler", help="grid (every legal point), tpe, or auto "
                                    "(grid when the legal space is small)"),
    jobs: int = typer.Option(None, "--jobs", "-j", min=1, help="worker processes per GPU: they compile and "
                             "check in parallel and time one at a time (default 8 on CUDA)"),
    devices: str = typer.Option(None, "--devices", help="GPU ordinals, e.g. 0,1,2,3: one tuning process per GPU, "
                                "all adding trials to the same studies"),
    db: Path = typer.Option(None, "--db", help="tuning-database file to record winners in (default: the user's "
                            "<cache>/autotune_db/<gpu-type>.json)"),
    backend: Backend = BACKEND_OPTION,
    device: TuneDevice = typer.Option(None, "--device", help="where candidates run: cuda (default when torch "
                                      "sees a GPU) or cpu (TVM's llvm kernels; with --backend triton the "
                                      "interpreter, which only tests the tuner: its times mean nothing)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines"),
) -> None:
    """Tune SPEC's kernels on this GPU: one Optuna study per kernel and shape bucket.

    Every candidate schedule is legal by construction, compiled, checked against the float64
    reference on fresh inputs and timed with CUDA events in a worker process (a crash or a hang
    costs one trial). The best of each study goes to the tuning database. Ctrl-C stops cleanly;
    the same command again resumes.
    """
    import time

    from dsagen.kernels import detected_gpu
    from dsagen.tuning.storage import describe, open_storage
    from dsagen.backends.triton import interpreter_problem
    from dsagen.backends.tvm import available as tvm_available
    from dsagen.gpus import cpu_type
    from dsagen.tuning.worker import Worker

    spec = _load(spec_path)
    pairs = _shapes(S, SKV, shapes)
    device = _device_for("tune", backend, device, "tune the CPU kernels with --backend tvm")
    if backend == Backend.tvm and (problem := tvm_available()):
        raise ValueError(problem)
    if devices:
        raise typer.Exit(_spawn_device_workers(devices))
    open_storage(storage)  # a bad URL or an unreachable server fails before any work
    if device == TuneDevice.cuda:
        gpu_type = detected_gpu()[0]
    else:
        gpu_type = cpu_type() if backend == Backend.tvm else "cpu-triton-interpreter"
    n_jobs = jobs or (8 if device == TuneDevice.cuda else 1)  # CPU timings need the CPU to themselves
    typer.echo(f"tuning {spec.name} ({backend.value}) on {gpu_type}: kernels {', '.join(_kernels(kernel))}; shapes "
               f"{', '.join(f'S={a} SKV={b}' for a, b in pairs)}; storage {describe(storage)}; {n_jobs} worker(s)")
    t0 = time.monotonic()
    results = []
    pool = [Worker() for _ in range(n_jobs)]  # warm worker processes shared by every study
    try:
        if device == TuneDevice.cpu and backend == Backend.triton and (problem := interpreter_problem()):
            raise ValueError(problem)
        common = dict(device=device.value, gpu_type=gpu_type, backend=backend.value, trials=trials, timeout_s=timeout,
                      trial_timeout_s=trial_timeout, storage=storage, sampler=sampler.value, db_path=db, jobs=n_jobs)
        _tune_all(spec, pairs, _kernels(kernel), common, pool, quiet, results)
    except KeyboardInterrupt:  # between studies or while one starts: nothing measured is lost
        typer.echo("interrupted: what was measured is kept; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    finally:
        for w in pool:
            w.close()
    typer.echo(f"tuned {len(results)} studies in {time.monotonic() - t0:.0f} s")


def _tune_all(spec, pairs, kernels: list[str], common: dict, pool, quiet: bool, results: list) -> None:
    """One study per (shape, kernel), in order, on a shared pool of worker processes; stop on Ctrl-C."""
    from dsagen.tuning.study import TuneRequest, tune_kernel

    for s, skv in pairs:
        for name in kernels:
            r = tune_kernel(TuneRequest(spec, name, s, skv, **common), progress=not quiet, workers=pool)
            results.append(r)
            fails = ", ".join(f"{n} {k}" for k, n in sorted(r.failures.items())) or "none"
            best = f"best {r.best_ms:.4f} ms {r.best_point}" if r.best_ms is not None else "no passing candidate"
            typer.echo(f"{name} S={s} SKV={skv}: {best}; {r.evaluated}/{r.budget} trials "
                       f"({r.sampler}, {r.legal} legal points; {r.evaluated_here} here, failed: {fails}); {r.db_outcome}")
            if r.interrupted:
                typer.echo("interrupted: what was measured is kept; run the same command again to resume", err=True)
                raise typer.Exit(130)


@app.command()
@friendly_errors
def bench(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="TOML spec file"),
    kernel: list[Kernel] = typer.Option(None, "--kernel", "-k", help="kernel to time (repeatable; default all three)"),
    S: list[int] = typer.Option(None, "--S", min=1, help="query tokens (repeatable)"),
    SKV: list[int] = typer.Option(None, "--SKV", min=1, help="context tokens (repeatable)"),
    shapes: str = typer.Option(None, "--shapes", help="a named shape set instead of --S/--SKV (v32, smoke)"),
    out: Path = typer.Option(None, "-o", "--out", help="directory for bench-<gpu>-<date>.json and .png"),
    dense: bool = typer.Option(True, "--dense/--no-dense", help="also time dense attention of the same shape "
                               "(CUDA only)"),
    backend: Backend = BACKEND_OPTION,
    device: TuneDevice = typer.Option(None, "--device", help="cuda (default when torch sees a GPU) or cpu "
                                      "(--backend tvm only)"),
) -> None:
    """Time SPEC's kernels (tuned schedules) beside naive PyTorch and dense attention.

    A table of ms, TFLOP/s, % of the roofline floor and speed-up, each kernel checked against the
    float64 reference first; with --out also JSON and a PNG of time against context length.
    """
    import datetime
    import json

    from dsagen import build
    from dsagen.bench import format_table, plot, run_bench
    from dsagen.gpus import GPUS, get_gpu
    from dsagen.pipeline import DEFAULT_GPU

    spec = _load(spec_path)
    pairs = _shapes(S, SKV, shapes)
    device = _device_for("bench", backend, device, "time the CPU kernels with --backend tvm --device cpu")
    if device == TuneDevice.cpu and backend == Backend.triton:
        raise ValueError("--device cpu times the TVM backend's CPU kernels: add --backend tvm "
                         "(Triton on the CPU is an interpreter for tests, not for timing)")
    kernels = build(spec, backend=backend.value)
    gpu = get_gpu(kernels.gpu_type if kernels.gpu_type in GPUS else DEFAULT_GPU)
    typer.echo(format_table([]).splitlines()[0])
    payload = run_bench(kernels, gpu, pairs, _kernels(kernel), dense=dense and device == TuneDevice.cuda,
                        progress=typer.echo, device=device.value)
    if out is not None:
        from dsagen.fileio import atomic_write_text
        from dsagen.gpus import cpu_type

        where = kernels.gpu_type if device == TuneDevice.cuda else cpu_type()
        stem = f"bench-{backend.value}-{where}-{datetime.date.today().isoformat()}"
        atomic_write_text(out / f"{stem}.json", json.dumps(payload, indent=1))
        typer.echo(f"wrote {out / (stem + '.json')}")
        if payload["dsa_vs_dense"]:
            try:
                typer.echo(f"wrote {plot(payload, out / (stem + '.png'))}")
            except ImportError:
                typer.echo("no plot: matplotlib is missing (pip install 'dsagen[bench]')", err=True)


@app.command()
@friendly_errors
def explain(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="TOML spec file"),
    S: int = typer.Option(4096, "--S", min=1, help="query tokens"),
    SKV: int = typer.Option(32768, "--SKV", min=1, help="context tokens"),
    gpu: str = typer.Option(None, "--gpu", help="GPU type whose tuning database to consult (default: the GPU "
                            "torch sees)"),
    backend: Backend = BACKEND_OPTION,
    device: TuneDevice = typer.Option(TuneDevice.cuda, "--device", help="cuda, or cpu (TVM's CPU kernels)"),
) -> None:
    """Say which schedule each kernel of SPEC uses at (S, SKV), and where it comes from.

    Sources, in order: the tuning database (exact or nearest shape bucket, or another GPU type of
    the same compute capability), the spec's pinned knobs, the search space's defaults.
    """
    from dsagen import build

    spec = _load(spec_path)
    kernels = build(spec, backend=backend.value, gpu=gpu)
    if device == TuneDevice.cpu:
        from dsagen.gpus import cpu_type

        where = cpu_type() if backend == Backend.tvm else "the CPU (Triton interpreter: defaults and pinned knobs)"
    else:
        where = kernels.gpu_type or "no GPU (defaults and pinned knobs only)"
    typer.echo(f"{spec.name} ({backend.value}) at S={S} SKV={SKV} on {where}")
    for name, info in kernels.explain(S, SKV, device.value).items():
        sched = " ".join(f"{k}={v}" for k, v in info["schedule"].items())
        typer.echo(f"  {name:<17} {sched}\n  {'':<17} from: {info['source']}")
        if info["stale"]:
            typer.echo(f"  {'':<17} stale: {'; '.join(info['stale'])}")


def _register_db() -> None:
    from dsagen.tuning.db_cli import db_app

    app.add_typer(db_app, name="db")


_register_db()


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
