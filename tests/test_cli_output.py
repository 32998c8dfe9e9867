"""What the `dsagen` command prints when used as a new user would: closed pipes, hostile names,
errors that name the file, CPU benchmark tables and their warnings."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsagen.cli import app

ROOT = Path(__file__).resolve().parents[1]
V32 = ROOT / "specs" / "deepseek_v32.toml"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SMALL = """
name = "small"
[indexer]
heads = 3
head_dim = 40
dtype = "bf16"
[topk]
k = 9
[attention]
heads = 5
qk_dim = 80
v_dim = 48
dtype = "bf16"
"""


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})
    result.plain = ANSI.sub("", result.output)
    return result


def test_a_closed_pipe_ends_the_command_quietly(tmp_path, child_env):
    proc = subprocess.run(f"{sys.executable} {ROOT / 'cli.py'} check {V32} | head -1", shell=True, cwd=tmp_path,
                          env=child_env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.startswith(f"spec {V32}: valid")
    assert "error" not in proc.stderr and "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["check", "explain"])
def test_a_spec_name_cannot_write_control_characters_to_the_terminal(tmp_path, command):
    spec = tmp_path / "evil.toml"
    spec.write_text(SMALL.replace('name = "small"', 'name = "x\\u001b[2K\\rerror: fake\\u202e"'))
    result = invoke(command, spec, "--S", "8", "--SKV", "64")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\r" not in result.output and "\u202e" not in result.output
    assert "x\\x1b[2K\\x0derror: fake\\u202e" in result.output
    assert not any(line.startswith("error:") for line in result.output.splitlines())


def test_a_bad_pinned_knob_names_the_spec_file(tmp_path):
    spec = tmp_path / "pinned.toml"
    spec.write_text(SMALL + "\n[schedule.topk]\nblock_n = 3\n")
    result = invoke("check", spec)
    assert result.exit_code == 1
    assert re.match(rf"error: {re.escape(str(spec))}: schedule.topk.block_n=3 is not allowed", result.plain)
    spec.write_text(SMALL + "\n[schedule.topk]\nblok_n = 256\n")
    result = invoke("explain", spec)
    assert result.exit_code == 1 and f"{spec}: schedule.topk.blok_n is not a knob" in result.plain


def test_the_cpu_bench_table_leaves_gpu_columns_empty_and_warns_when_k_covers_the_row(tmp_path):
    from dsagen.backends.tvm import available

    if available() is not None:
        pytest.skip(str(available()))
    spec = tmp_path / "small.toml"
    spec.write_text(SMALL)
    result = invoke("bench", spec, "--backend", "tvm", "--device", "cpu", "-k", "topk", "-k", "indexer",
                    "--S", "6", "--SKV", "8", "--SKV", "40", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.plain
    rows = [line for line in result.plain.splitlines() if re.match(r"^(topk|indexer)\s+6\s", line)]
    assert len(rows) == 4, result.plain
    for row in rows:
        assert "%" not in row and not re.search(r"\s0\s", row.split("  ")[0]), row
    assert "warning: topk S=6 SKV=8: SKV=8 <= k=9" in result.plain
    assert "warning: topk S=6 SKV=40" not in result.plain
    assert "no plot: the plot compares DSA with dense attention, and dense attention is timed on CUDA only" \
        in result.plain
    assert (tmp_path / "out").is_dir() and list((tmp_path / "out").glob("*.json"))
