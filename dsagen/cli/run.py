"""`dsagen tune` and `dsagen bench`: the commands that run kernels on this machine."""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from .errors import friendly_errors
from .options import (BACKEND_OPTION, KERNEL_HELP, SPEC_ARGUMENT, Backend, Device, default_kernels, kernel_names,
                      load_checked_spec, run_device, shapes)


class Sampler(str, Enum):
    auto = "auto"
    grid = "grid"
    tpe = "tpe"


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
        procs.append(subprocess.Popen([sys.executable, "-m", "dsagen.cli", *argv], env=env))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        codes = [p.wait() for p in procs]  # each got the Ctrl-C too and stops cleanly
    return max(codes)


def tune(
    spec_path: Path = SPEC_ARGUMENT,
    kernel: list[str] = typer.Option(None, "--kernel", "-k", help=KERNEL_HELP + "; default the three stages"),
    variant: list[str] = typer.Option(None, "--variant", help="tune only this variant (algorithm) of the kernels "
                                      "that have several, e.g. gluon_split (repeatable); default: the one the "
                                      "spec pins, else every variant this device runs, one study each"),
    S: list[int] = typer.Option(None, "--S", min=1, help="query tokens (repeatable)"),
    SKV: list[int] = typer.Option(None, "--SKV", min=1, help="context tokens (repeatable)"),
    shape_set: str = typer.Option(None, "--shapes", help="a named shape set instead of --S/--SKV: v32 (S 1024, "
                                  "4096 x SKV 8192, 32768, 131072), decode (S = B requests 2, 32, 128 x SKV = "
                                  "context 32768, 131072; default kernels: the decode ones) or smoke"),
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
                             "check in parallel and time one at a time (default 8 on CUDA, 1 on the CPU)"),
    devices: str = typer.Option(None, "--devices", help="GPU ordinals, e.g. 0,1,2,3: one tuning process per GPU, "
                                "all adding trials to the same studies"),
    db: Path = typer.Option(None, "--db", help="tuning-database file to record winners in (default: the user's "
                            "<cache>/autotune_db/<gpu-type>.json)"),
    backend: Backend = BACKEND_OPTION,
    device: Device = typer.Option(None, "--device", help="where candidates run: cuda (default when torch sees a "
                                  "GPU) or cpu (TVM's llvm kernels, tuned for this CPU; with --backend triton the "
                                  "interpreter, which only tests the tuner: its times mean nothing)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines"),
) -> None:
    """Tune SPEC's kernels on this GPU or CPU: one Optuna study per kernel, variant and shape bucket.

    A kernel with several variants (sparse_attention: tl, gluon, gluon_split) has a study per
    variant this device runs (Gluon on compute capability 9.0 only, never on the CPU), or per
    --variant; each winner must beat the schedule builds run today, of whichever variant.

    Every candidate schedule is legal by construction, compiled, checked against the float64
    reference on fresh inputs and timed (CUDA graphs and events on a GPU, wall clock on the CPU) in
    a worker process (a crash or a hang costs one trial). The best of each study goes to the
    tuning database. Ctrl-C stops cleanly; the same command again resumes.
    """
    import time

    from dsagen.backends.triton import interpreter_problem
    from dsagen.backends.tvm import available as tvm_available
    from dsagen.gpus import cpu_type
    from dsagen.resolve import detected_gpu
    from dsagen.tuning.storage import describe, open_storage
    from dsagen.tuning.study import check_db_file
    from dsagen.tuning.worker import Worker

    spec = load_checked_spec(spec_path, backend.value)
    pairs = shapes(S, SKV, shape_set)
    names = kernel_names(kernel, default_kernels(spec, backend.value, shape_set), spec=spec, backend=backend.value)
    device = run_device("tune", backend, device, "tune the CPU kernels with --backend tvm")
    if backend == Backend.tvm and (problem := tvm_available()):
        raise ValueError(problem)
    if devices and device == Device.cpu:
        raise ValueError("--devices starts one tuning process per GPU, and --device cpu times candidates on this "
                         "CPU, one at a time: drop --devices (--jobs N compiles N candidates at once on the CPU)")
    if devices:
        raise typer.Exit(_spawn_device_workers(devices))
    open_storage(storage)  # a bad URL or an unreachable server fails before any work
    if device == Device.cuda:
        gpu_type = detected_gpu()[0]
    else:
        gpu_type = cpu_type() if backend == Backend.tvm else "cpu-triton-interpreter"
    check_db_file(db, gpu_type)  # a misnamed, corrupt or unwritable database fails before any study
    studies = _studies(spec, names, backend.value, device.value, gpu_type, variant)
    n_jobs = jobs or (8 if device == Device.cuda else 1)  # CPU timings need the CPU to themselves
    typer.echo(f"tuning {spec.name!r} ({backend.value}) on {gpu_type}: kernels {_listed(studies)}; shapes "
               f"{', '.join(f'S={a} SKV={b}' for a, b in pairs)}; storage {describe(storage)}; {n_jobs} worker(s)")
    t0 = time.monotonic()
    results = []
    pool = [Worker() for _ in range(n_jobs)]  # warm worker processes shared by every study
    try:
        if device == Device.cpu and backend == Backend.triton and (problem := interpreter_problem()):
            raise ValueError(problem)
        common = dict(device=device.value, gpu_type=gpu_type, backend=backend.value, trials=trials, timeout_s=timeout,
                      trial_timeout_s=trial_timeout, storage=storage, sampler=sampler.value, db_path=db, jobs=n_jobs)
        _tune_all(spec, pairs, studies, common, pool, quiet, results)
    except KeyboardInterrupt:  # between studies or while one starts: nothing measured is lost
        typer.echo("interrupted: what was measured is kept; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    finally:
        for w in pool:
            w.close()
    typer.echo(f"tuned {len(results)} studies in {time.monotonic() - t0:.0f} s")
    unrecorded = [r.record_error for r in results if r.record_error]
    if unrecorded:  # each study ran; say that some winners are missing from the database
        raise ValueError(f"{len(unrecorded)} of {len(results)} winners not recorded: {'; '.join(unrecorded)}")


def _studies(spec, kernels: list[str], backend: str, device: str, gpu_type: str,
             asked: list[str] | None) -> list[tuple[str, str | None]]:
    """(kernel, variant) of every study a run makes per shape, checked before any starts: --variant
    names must be variants of the kernels tuned, and runnable on this device."""
    from dsagen.tuning.study import tunable_variants

    studies = [(k, v) for k in kernels for v in tunable_variants(spec, k, backend, device, gpu_type, asked)]
    tuned = {v for _, v in studies}
    unknown = [n for n in asked or () if n not in tuned]
    if unknown:
        from dsagen.schedule import variant_names

        known = sorted({n for k in kernels for n in variant_names(k)})
        raise ValueError(f"--variant {', '.join(unknown)}: not a variant of the kernels tuned ({', '.join(kernels)}); "
                         f"allowed {', '.join(known) or 'none (they have one algorithm each)'}")
    return studies


def _listed(studies: list[tuple[str, str | None]]) -> str:
    """'indexer, sparse_attention (tl, gluon)': the kernels a run tunes and their variants."""
    by_kernel: dict[str, list[str]] = {}
    for kernel, variant in studies:
        by_kernel.setdefault(kernel, []).extend([variant] if variant is not None else [])
    return ", ".join(k + (f" ({', '.join(v)})" if v else "") for k, v in by_kernel.items())


def _tune_all(spec, pairs, studies: list[tuple[str, str | None]], common: dict, pool, quiet: bool,
              results: list) -> None:
    """One study per (shape, kernel, variant), in order, on a shared pool of worker processes; stop on
    Ctrl-C."""
    from dsagen.tuning.study import TuneRequest, study_label, trial_count, tune_kernel

    for s, skv in pairs:
        for name, variant in studies:
            r = tune_kernel(TuneRequest(spec, name, s, skv, variant=variant, **common), progress=not quiet,
                            workers=pool)
            results.append(r)
            fails = ", ".join(f"{n} {k}" for k, n in sorted(r.failures.items())) or "none"
            best = f"best {r.best_ms:.4f} ms {r.best_point}" if r.best_ms is not None else "no passing candidate"
            trials = trial_count(r.evaluated, r.budget)
            typer.echo(f"{study_label(name, r.variant)} S={s} SKV={skv}: {best}; {trials} ({r.sampler}, "
                       f"{r.legal} legal points; "
                       f"{r.evaluated_here} here, failed: {fails}); {r.db_outcome}")
            if r.comparison:  # before and after: the schedule builds ran, against the winner
                typer.echo(f"  {r.comparison}")
            if r.interrupted:
                typer.echo("interrupted: what was measured is kept; run the same command again to resume", err=True)
                raise typer.Exit(130)


def bench(
    spec_path: Path = SPEC_ARGUMENT,
    kernel: list[str] = typer.Option(None, "--kernel", "-k", help=KERNEL_HELP + "; default the three stages"),
    S: list[int] = typer.Option(None, "--S", min=1, help="query tokens (repeatable)"),
    SKV: list[int] = typer.Option(None, "--SKV", min=1, help="context tokens (repeatable)"),
    shape_set: str = typer.Option(None, "--shapes", help="a named shape set instead of --S/--SKV: v32, decode "
                                  "(default kernels: the decode ones) or smoke"),
    out: Path = typer.Option(None, "-o", "--out", help="directory for bench-<backend>-<where>-<date>.json (and "
                             ".png with dense attention, CUDA only)"),
    dense: bool = typer.Option(True, "--dense/--no-dense", help="also time dense attention of the same shape "
                               "(CUDA only)"),
    graph: bool = typer.Option(False, "--graph", help="time CUDA-graph replays instead of eager calls (how a "
                               "decode step runs: no host launch cost; CUDA only)"),
    backend: Backend = BACKEND_OPTION,
    device: Device = typer.Option(None, "--device", help="cuda (default when torch sees a GPU) or cpu "
                                  "(--backend tvm only)"),
) -> None:
    """Time SPEC's kernels (the schedules a build resolves) beside naive PyTorch in the same run.

    Columns: ms (median), naive ms, speed-up, TFLOP/s, GB/s (minimum bytes / time), the roofline
    floor and % of it (GPU only). Every kernel is checked against the float64 reference first;
    with --out also JSON, and on CUDA a PNG of DSA against dense attention by context length.
    """
    import datetime
    import json

    from dsagen import build
    from dsagen.bench import format_table, plot, run_bench

    spec = load_checked_spec(spec_path, backend.value)
    pairs = shapes(S, SKV, shape_set)
    names = kernel_names(kernel, default_kernels(spec, backend.value, shape_set), spec=spec, backend=backend.value)
    device = run_device("bench", backend, device, "time the CPU kernels with --backend tvm --device cpu")
    if device == Device.cpu and backend == Backend.triton:
        raise ValueError("--device cpu times the TVM backend's CPU kernels: add --backend tvm "
                         "(Triton on the CPU is an interpreter for tests, not for timing)")
    kernels = build(spec, backend=backend.value)
    gpu = kernels.plan_gpu
    typer.echo(format_table([]).splitlines()[0])
    if graph and device != Device.cuda:
        raise ValueError("--graph times CUDA-graph replays: it needs --device cuda")
    payload = run_bench(kernels, gpu, pairs, names, dense=dense and device == Device.cuda,
                        progress=typer.echo, device=device.value, graph=graph)
    if device == Device.cpu:
        typer.echo("(CPU run: no roofline, GB/s or % columns; they describe a GPU)")
    if out is not None:
        from dsagen.fileio import atomic_write_text
        from dsagen.gpus import cpu_type

        where = kernels.gpu_type if device == Device.cuda else cpu_type()
        stem = f"bench-{backend.value}-{where}-{datetime.date.today().isoformat()}"
        atomic_write_text(out / f"{stem}.json", json.dumps(payload, indent=1))
        typer.echo(f"wrote {out / (stem + '.json')}")
        if payload["dsa_vs_dense"]:
            try:
                typer.echo(f"wrote {plot(payload, out / (stem + '.png'))}")
            except ImportError:
                typer.echo("no plot: matplotlib is missing (pip install 'dsagen[bench]')", err=True)
        else:
            why = ("dense attention is timed on CUDA only" if device == Device.cpu
                   else "it needs the three stages and dense attention (no --kernel subset, no --no-dense)")
            typer.echo(f"no plot: the plot compares DSA with dense attention, and {why}", err=True)


def register(app: typer.Typer) -> None:
    for fn in (tune, bench):
        app.command(name=fn.__name__)(friendly_errors(fn))
