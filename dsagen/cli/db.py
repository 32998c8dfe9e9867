"""`dsagen db ...`: look at, merge, export and prune the per-GPU tuning databases (dsagen.db)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import List, Optional

import typer

from .. import db as tdb
from .errors import friendly_errors, printable
from ..db.buckets import parse_bucket
from ..db.lookup import borrowing_gpu_types, sibling_files

db_app = typer.Typer(
    help="Inspect, merge and export the tuning databases (one JSON file per GPU type; the user's "
         "folder is searched before the shipped autotune_db/).",
    no_args_is_help=True,
)

_DIR_HELP = "database folder to read (repeatable); default: the user's folder, then the shipped one"


def _dirs(given: Optional[List[Path]]) -> list[Path]:
    """--dir folders (each must be one), else the user's and the shipped folder."""
    if not given:
        return tdb.default_dirs()
    for folder in given:
        if not folder.is_dir():
            what = "is a file" if folder.exists() else "does not exist"
            raise ValueError(f"--dir {printable(str(folder))}: {what}; give a folder of <gpu-type>.json tuning "
                             "databases")
    return list(given)


def _label(directory: Path, path: Path) -> str:
    """'user' or 'shipped' for the two standard folders, else the file's path."""
    named = {"user": tdb.user_db_dir()}
    try:
        named["shipped"] = tdb.shipped_db_dir()
    except FileNotFoundError:
        pass
    for name, folder in named.items():
        if Path(directory).resolve() == Path(folder).resolve():
            return name
    return str(path)


def _matching(dirs: list[Path], gpu: str | None, kernel: str | None = None, bucket: str | None = None,
              spec_hash: str | None = None):
    """(label, file, entry) for every entry in the folders that passes the filters, in file order."""
    if gpu is not None:
        tdb.check_gpu_type(gpu)
    if bucket is not None:
        parse_bucket(bucket)
    for directory in dirs:
        for path in tdb.db_files(directory):
            if gpu is not None and path.stem != gpu:
                continue
            label = _label(directory, path)
            for entry in tdb.load(path).entries.values():
                if kernel is not None and entry.kernel != kernel:
                    continue
                if bucket is not None and entry.bucket != bucket:
                    continue
                if spec_hash is not None and not entry.spec_hash.startswith(spec_hash):
                    continue
                yield label, path, entry


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _roofline_pct(entry: tdb.Entry) -> str:
    """The %ROOF cell, empty ("-") for an entry tuned on a CPU: a CPU has no roofline, and a
    percentage recorded there would be of a GPU's floor."""
    return "-" if entry.compute_capability == "cpu" else _number(entry.pct_of_roofline, ".1f")


def _stale(entry: tdb.Entry) -> str:
    """The STALE cell: empty when current, else which versions differ (recorded != running)."""
    why = tdb.stale_fields(entry)
    return f"stale: {', '.join(why)}" if why else ""


def _schedule(entry: tdb.Entry) -> str:
    if not entry.schedule:
        return "(empty: skipped by builds)"
    return " ".join(f"{k}={v}" for k, v in sorted(entry.schedule.items()))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _file_name(label: str, path: Path) -> str:
    """'shipped nvidia-h200.json' in a standard folder, else the file's path (its label)."""
    return f"{label} {path.name}" if label in ("user", "shipped") else label


def _device(device_name: str, cc: str) -> str:
    """'NVIDIA H200 (compute capability 9.0)'; a CPU's device name says what it is on its own."""
    name = printable(device_name) or "an unnamed device"
    return name if cc == "cpu" else f"{name} (compute capability {cc})"


def _tuned_on(entries: list[tdb.Entry], dirs: list[Path]) -> str:
    """How many of a file's listed entries were measured on which device, and the GPU types without
    a file of their own whose builds borrow entries of that compute capability."""
    counts = Counter((e.device_name, e.compute_capability) for e in entries)
    devices = [f"{n} {'entries' if n > 1 else 'entry'} tuned on {_device(*device)}"
               for device, n in counts.most_common()]
    borrowers = sorted({g for _, cc in counts if cc != "cpu" for g in borrowing_gpu_types(cc, dirs)})
    served = (f"; also serves {', '.join(borrowers)} (same compute capability, no file of its own)"
              if borrowers else "")
    return ", ".join(devices) + served


def _no_entries(gpu: str | None, dirs: list[Path]) -> str:
    """The answer when nothing is listed; for a GPU type, whose files its builds borrow from (a
    build takes another GPU type's entry where its own files hold none for that kernel and spec)."""
    lenders = [_file_name(_label(path.parent, path), path) for path in sibling_files(gpu, dirs)] if gpu else []
    if not lenders:
        return "no tuned entries"
    return (f"no tuned entries of {gpu}; its builds use the entries tuned on its compute capability in "
            f"{', '.join(lenders)}")


@db_app.command("list")
@friendly_errors
def list_entries(
    gpu: Optional[str] = typer.Option(None, "--gpu", help="only this GPU type, e.g. nvidia-h200"),
    kernel: Optional[str] = typer.Option(None, "--kernel", "-k", help="only this kernel"),
    dirs: Optional[List[Path]] = typer.Option(None, "--dir", help=_DIR_HELP),
) -> None:
    """List the tuned entries, one line each, then per file the GPU its entries were tuned on.

    STALE says why an entry was tuned with other versions than this process runs, recorded
    version != running version, e.g. "stale: torch 2.11.0+cu130 != 2.13.0+cpu". A GPU type with
    no file of its own is served by the files of its compute capability; the last lines say which.
    """
    folders = _dirs(dirs)
    rows = [["FILE", "GPU", "KERNEL", "BUCKET", "SPEC", "MS", "%ROOF", "DATE", "STALE", "SCHEDULE"]]
    by_file: dict[str, list[tdb.Entry]] = {}
    for label, path, e in _matching(folders, gpu, kernel):
        rows.append([label, e.gpu_type, e.kernel, e.bucket, e.spec_hash[:8], _number(e.ms, ".4g"),
                     _roofline_pct(e), e.date[:10], _stale(e), _schedule(e)])
        by_file.setdefault(_file_name(label, path), []).append(e)
    if not by_file:
        typer.echo(_no_entries(gpu, folders))
        return
    typer.echo(_table(rows) + "\n")
    for name, entries in by_file.items():
        typer.echo(f"{name}: {_tuned_on(entries, folders)}")


@db_app.command("show")
@friendly_errors
def show(
    gpu: Optional[str] = typer.Option(None, "--gpu", help="only this GPU type"),
    kernel: Optional[str] = typer.Option(None, "--kernel", "-k", help="only this kernel"),
    bucket: Optional[str] = typer.Option(None, "--bucket", help="only this bucket, e.g. S4096-SKV32768"),
    spec_hash: Optional[str] = typer.Option(None, "--spec-hash", help="only spec hashes starting with this"),
    dirs: Optional[List[Path]] = typer.Option(None, "--dir", help=_DIR_HELP),
) -> None:
    """Print the matching entries with all their fields as JSON, each with the file it came from."""
    shown = [{"file": str(path), "folder": label if label in ("user", "shipped") else "--dir",
              "stale": tdb.stale_fields(entry), "entry": entry.to_json()}
             for label, path, entry in _matching(_dirs(dirs), gpu, kernel, bucket, spec_hash)]
    typer.echo(json.dumps(shown, indent=2) if shown else "no tuned entries match")


@db_app.command("merge")
@friendly_errors
def merge(
    a: Path = typer.Argument(..., metavar="A", help="database to merge into (<gpu>.json)"),
    b: Path = typer.Argument(..., metavar="B", help="database to merge from (same GPU type)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="write the result here instead of into A"),
) -> None:
    """Merge database B into A (or into OUT): per entry the faster one wins, on a tie the later date."""
    counts = tdb.merge(a, b, out)
    typer.echo(f"merged {b} into {out if out is not None else a}: {counts['added']} added, "
               f"{counts['replaced']} replaced, {counts['kept']} kept, {counts['total']} entries in total")


@db_app.command("prune")
@friendly_errors
def prune(
    path: Path = typer.Argument(..., metavar="FILE", help="database file to prune (<gpu>.json)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only list what would be dropped"),
) -> None:
    """Drop entries whose schedule no longer fits today's search spaces (schedules/<backend>/<kernel>.toml,
    or the space of the variant an entry names, e.g. sparse_attention_gluon_split.toml).

    After a template grows a knob, entries recorded before it name only the old knobs; builds
    already pass over them, and pruning removes them from the file so it says what is really used.
    An entry with an empty schedule, or naming a variant its kernel lacks, is dropped too. Entries
    of a kernel or backend this install has no search space for (say, a plugin that is not
    installed here) cannot be judged and are kept.
    """
    from ..errors import DsagenError, ScheduleError
    from ..ops import get_op
    from ..schedule import load_space, recorded_schedule

    unjudged: list[tuple[tdb.Entry, str]] = []

    def fits(entry: tdb.Entry) -> bool:
        try:
            op = get_op(entry.kernel)
            load_space(entry.backend, op)
        except DsagenError as exc:
            unjudged.append((entry, str(exc)))
            return True
        try:  # the entry's own variant (an older form read as builds read it), checked against its space
            variant, knobs = recorded_schedule(op, entry.backend, entry.schedule)
            space = load_space(entry.backend, op, variant)
            space.check_names(knobs, "schedule")
        except ScheduleError:
            return False
        return bool(knobs) and space.names_every_knob(knobs)

    if not path.is_file():
        raise tdb.TuningDBError(f"{path}: no such database file")
    dropped = tdb.prune(path, fits, dry_run=dry_run)
    for e, why in unjudged:
        typer.echo(f"kept {e.kernel} {e.backend} {e.bucket}: no search space here ({why})")
    for e in dropped:
        typer.echo(f"{'would drop' if dry_run else 'dropped'} {e.kernel} {e.backend} {e.bucket} {e.schedule}")
    typer.echo(f"{len(dropped)} entries {'would be ' if dry_run else ''}dropped from {path}")


@db_app.command("annotate")
@friendly_errors
def annotate(
    path: Path = typer.Argument(..., metavar="FILE", help="database file to annotate (<gpu>.json)"),
    specs: List[Path] = typer.Argument(..., metavar="SPEC...", help="spec files the entries were tuned from"),
) -> None:
    """Record, in entries tuned before dsagen kept them, the semantic fields (heads, dims, dtypes)
    of the SPECs they were tuned from, matched by spec hash.

    A build whose spec has a head count nobody tuned then uses the entry of the nearest tuned head
    count (when its schedule is legal there) instead of the defaults; `dsagen explain` says so.
    Entries that already carry their fields, or match none of the SPECs, are left as they are.
    """
    from ..ops import all_ops, semantic_hash
    from ..spec import load_spec

    if not path.is_file():
        raise tdb.TuningDBError(f"{path}: no such database file")
    known = {}
    for spec_path in specs:
        spec = load_spec(spec_path)
        for op in all_ops():
            try:
                fields = tdb.recordable_semantics(op.semantic_fields(spec))
            except (AttributeError, TypeError, ValueError):  # a spec without this op's sections
                continue
            if fields is not None:
                known[(op.name, semantic_hash(spec, op))] = fields
    done = tdb.annotate(path, known)
    for e in done:
        typer.echo(f"annotated {e.kernel} {e.backend} {e.bucket}: {e.semantics}")
    typer.echo(f"{len(done)} entries of {path} annotated")


@db_app.command("export")
@friendly_errors
def export(
    gpu: str = typer.Option(..., "--gpu", help="GPU type to export, e.g. nvidia-h200"),
    out: str = typer.Option("-", "-o", "--out", help="file to write (<gpu>.json), or - for stdout"),
    dirs: Optional[List[Path]] = typer.Option(None, "--dir", help=_DIR_HELP),
) -> None:
    """Export one GPU type's effective entries (user over shipped) in the database file format.

    This is how tuning results become the committed autotune_db/<gpu>.json:
    `dsagen db export --gpu nvidia-h200 -o autotune_db/nvidia-h200.json`.
    """
    db = tdb.effective_entries(gpu, _dirs(dirs))
    if out == "-":
        typer.echo(tdb.dump(db), nl=False)
        return
    path = Path(out)
    if path.stem != gpu:
        raise tdb.TuningDBError(f"{path}: the database of {gpu} must be written to a file named {gpu}.json")
    db.path = path
    tdb.check_writable(path)
    with tdb.lock_for(path):
        tdb.save(db)
    typer.echo(f"exported {len(db.entries)} entries of {gpu} to {path}", err=True)
