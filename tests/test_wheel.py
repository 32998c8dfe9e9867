"""The wheel carries everything a user needs: build it, install it alone, run `dsagen` from it.

The installed copy runs in a fresh virtual environment (no system site-packages) from a temporary
working directory, with only the wheel's files and the third-party dependencies (torch, triton, ...)
of the running interpreter on its path, so nothing can fall back on this source checkout.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import dsagen

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
V32 = ROOT / "specs" / "deepseek_v32.toml"


def run(args, cwd: Path, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend (hatchling, in the test extra) comes from this environment,
    # so the test needs no package index
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, ROOT], cwd=out)
    (path,) = out.glob("dsagen-*.whl")
    return path


def test_wheel_contains_package_data_and_cli(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for op in dsagen.ops.own_ops():  # every kernel of the checkout: its op module, templates, schedules
        assert f"{type(op).__module__.replace('.', '/')}.py" in names, op.name
        for backend in op.backends:
            assert f"dsagen/_data/templates/{backend}/{op.name}.py.j2" in names, (op.name, backend)
            assert f"dsagen/_data/schedules/{backend}/{op.name}.toml" in names, (op.name, backend)
    assert "dsagen/_data/templates/triton/_header.j2" in names
    assert any(n.startswith("dsagen/_data/autotune_db/") for n in names)
    assert "dsagen/_data/autotune_db/README.md" in names
    assert "dsagen/_data/autotune_db/nvidia-h200.json" in names
    assert "cli.py" not in names, "the wheel must not install a top-level module named cli"
    assert "dsagen/__init__.py" in names and "dsagen/cli/__init__.py" in names
    assert not [n for n in names if n.startswith(("tests/", "specs/")) or "__pycache__" in n]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "dsagen = dsagen.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_runs_without_the_checkout(wheel, tmp_path):
    # a bare interpreter: a venv without system site-packages and without pip
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"

    # the wheel alone (no dependencies) into a target folder
    target = tmp_path / "target"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
         "--disable-pip-version-check", "--target", target, wheel], cwd=tmp_path)
    script = target / "bin" / "dsagen"
    assert script.is_file()

    # third-party dependencies from this interpreter's site-packages; PYTHONPATH entries do not
    # run .pth files, so an editable install of this checkout there is not picked up
    work = tmp_path / "work"
    work.mkdir()
    deps = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {"PYTHONPATH": os.pathsep.join([str(target), deps]), "DSAGEN_CACHE_DIR": str(tmp_path / "cache"),
            "PYTHONNOUSERSITE": "1"}

    where = run([python, "-c", "import sys, dsagen, dsagen.cli as cli, dsagen.resources as r; "
                 "print(dsagen.__file__); print(cli.__file__); print(r.data_dir('templates')); "
                 "print('\\n'.join(sys.path))"], cwd=work, env=env).stdout.splitlines()
    dsagen_file, cli_file, templates = (Path(p) for p in where[:3])
    assert dsagen_file.is_relative_to(target), dsagen_file
    assert cli_file.is_relative_to(target), cli_file
    assert templates == target / "dsagen" / "_data" / "templates"
    assert not [p for p in where[3:] if p and Path(p).resolve() == ROOT], "the checkout is on sys.path"

    helped = run([python, script, "--help"], cwd=work, env=env)
    for command in ("check", "generate", "show"):
        assert command in helped.stdout

    # the installed package finds its own ops (no import list), in the checkout's order
    found = run([python, "-c", "import dsagen; print(' '.join(dsagen.ops.names()))"], cwd=work, env=env)
    assert found.stdout.split() == [op.name for op in dsagen.ops.own_ops()]

    out = work / "generated"
    spec = work / "v32.toml"
    spec.write_text(V32.read_text())
    run([python, script, "generate", spec, "-o", out], cwd=work, env=env)
    files = sorted(p.name for p in out.glob("*.py"))
    # every kernel a Triton build of V3.2 offers (the three stages, the fused indexer + top-k and the
    # attention's backward: the indexer loss needs a bf16 indexer, which V3.2's fp8 one is not)
    kernels = [op.name for op in dsagen.ops.enabled(dsagen.load_spec(V32), "triton")]
    assert len(files) == len(kernels), files
    for kernel in kernels:
        assert any(f.startswith(kernel + "_") for f in files), kernel
    for path in out.glob("*.py"):
        assert path.read_text().startswith("# Generated by dsagen")

    # the shipped tuning database: a fresh machine (empty user cache) on an H200 gets tuned schedules
    helped = run([python, script, "--help"], cwd=work, env=env)
    for command in ("tune", "bench", "explain", "db"):
        assert command in helped.stdout
    explained = run([python, script, "explain", spec, "--S", "4096", "--SKV", "32768", "--gpu", "nvidia-h200"],
                    cwd=work, env=env).stdout
    assert explained.count("tuned (exact bucket S4096-SKV32768)") == 4, explained
    assert str(target / "dsagen" / "_data" / "autotune_db" / "nvidia-h200.json") in explained
