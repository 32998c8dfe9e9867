"""An in-tree kernel is its own files: an op module and its workload module in dsagen/ops/, its
templates and its schedule files, and no edit anywhere else.

A copy of the package gets the test kernel of tests/data/ops/masked_scale as one of dsagen's own
(its two modules dropped into dsagen/ops/ unchanged but for the line that points at its own data
folder, its templates and schedules beside dsagen's); a fresh Python on that copy finds it without
an import list, and build (its generated method included), the CLI (check, show, generate,
explain, tune, bench, --kernel's help), the torch op and its float64 reference all see it; a
plain run imports no workload module.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsagen.backends.triton import interpreter_problem

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "data" / "ops" / "masked_scale"
V32 = ROOT / "specs" / "deepseek_v32.toml"

CHILD = r"""
import inspect, json, sys
from pathlib import Path
import torch
from typer.testing import CliRunner
import dsagen
from dsagen.cli import app
from dsagen.workloads import workload

copy, spec_path, out, seed = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
assert Path(dsagen.__file__).is_relative_to(copy), dsagen.__file__
op = dsagen.ops.get_op("masked_scale")
runner = CliRunner()

def cli(*args):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, (args, result.output)
    return result.output

report = {
    "module": type(op).__module__, "own": [o.name for o in dsagen.ops.own_ops()],
    "check": cli("check", spec_path, "--S", "8", "--SKV", "40"),
    "show": cli("show", spec_path, "-k", "masked_scale", "--S", "8", "--SKV", "40"),
    "generate": cli("generate", spec_path, "-o", out),
    "explain": cli("explain", spec_path, "--S", "8", "--SKV", "40"),
    "help": cli("tune", "--help"),
    "tune": cli("tune", spec_path, "-k", "masked_scale", "--S", "5", "--SKV", "40", "--device", "cpu", "-q",
                "--trials", "1", "--db", Path(out).parent / "db" / "cpu-triton-interpreter.json",
                "--storage", Path(out).parent / "study.journal"),
    "bench": cli("bench", spec_path, "-k", "masked_scale", "--S", "6", "--SKV", "50", "--backend", "tvm",
                 "--device", "cpu"),
}
kernels = dsagen.build(dsagen.load_spec(spec_path))
report["built"] = kernels.kernels()
report["method"] = [str(inspect.signature(dsagen.DSAKernels.masked_scale)), dsagen.DSAKernels.masked_scale.__doc__]
inputs = workload(op).inputs(kernels.spec, 7, 45, "cpu", seed)
got = kernels.masked_scale(*inputs)  # through torch.ops.dsagen.masked_scale
report["torch_op"] = callable(getattr(torch.ops.dsagen, "masked_scale", None))
report["checked"] = workload(op).check(kernels.spec, inputs, got, torch.arange(7))
print(json.dumps(report))
"""


def in_tree_copy(dest: Path) -> Path:
    """dsagen's package and data, plus the toy kernel's files in the places an in-tree kernel's go."""
    for folder in ("dsagen", "templates", "schedules", "autotune_db"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    plugin = (TOY / "masked_scale.py").read_text()
    in_tree = re.sub(r"^    data_root = .*\n", "", plugin, flags=re.M)  # dsagen's own data folders
    assert in_tree != plugin
    (dest / "dsagen" / "ops" / "masked_scale.py").write_text(in_tree)
    shutil.copy(TOY / "masked_scale_workload.py", dest / "dsagen" / "ops")
    for backend in ("triton", "tvm"):
        shutil.copy(TOY / "templates" / backend / "masked_scale.py.j2", dest / "templates" / backend)
        shutil.copy(TOY / "schedules" / backend / "masked_scale.toml", dest / "schedules" / backend)
    return dest


def test_a_new_in_tree_kernel_needs_no_edit_outside_its_own_files(tmp_path, gen):
    if problem := interpreter_problem():
        pytest.skip(problem)  # the copy runs its Triton kernel on CPU tensors, and tunes it there
    copy = in_tree_copy(tmp_path / "tree")
    out = tmp_path / "generated"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DSAGEN_OPS")}
    env |= {"PYTHONPATH": str(copy), "DSAGEN_CACHE_DIR": str(tmp_path / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    seed = int(torch.randint(0, 10_000, (1,), generator=gen))
    proc = subprocess.run([sys.executable, "-c", CHILD, copy, V32, out, str(seed)], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    assert report["module"] == "dsagen.ops.masked_scale" and report["own"][-1] == "masked_scale"
    assert "masked_scale" in report["built"]
    assert report["method"] == ["(self, x, scale, ks, ke, *, out=None)",
                                "out [S, SKV] fp32: scale[t] * x[t, s] inside the row's window [ks[t], ke[t]), -inf "
                                "outside."]
    assert re.search(r"kernels \(triton\): .*\bmasked_scale\b", report["check"]), report["check"]
    assert "[masked_scale]" in report["check"]
    assert "def masked_scale(" in report["show"] and "_masked_scale_kernel" in report["show"]
    (module,) = out.glob("masked_scale*.py")
    assert re.search(rf"^masked_scale: {re.escape(str(module))}", report["generate"], re.M), report["generate"]
    assert "masked_scale" in report["explain"]
    assert "masked_scale" in report["help"]
    tuned = json.loads((tmp_path / "db" / "cpu-triton-interpreter.json").read_text())["entries"]
    assert [entry["kernel"] for entry in tuned] == ["masked_scale"]
    assert re.search(r"^masked_scale\s+6\s+50\s", report["bench"], re.M), report["bench"]
    assert report["torch_op"] and report["checked"].startswith("exact on 7 rows")
