"""The README's code blocks run as written.

The Python blocks run top to bottom in one namespace (each builds on the ones before it, as a reader
would paste them), on CUDA where torch sees a GPU and interpreted on the CPU otherwise. The TOML
block is a spec that loads. The quick start's `dsagen` commands run as written in a fresh cache
(its install steps are what this environment already did), and every other `dsagen` command line
names only options its command has.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: `&&`-separated, comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n", " ", block)
    out = []
    for line in text.splitlines():
        line = line.split("  #")[0].strip()
        if line and not line.startswith("#"):
            out.extend(part.strip() for part in line.split("&&"))
    return out


def dsagen_argv(command: str) -> list[str] | None:
    words = shlex.split(command)
    return words[1:] if words and words[0] == "dsagen" else None


def test_the_readme_has_the_blocks_this_file_runs():
    assert len(blocks("python")) >= 4
    assert len(blocks("toml")) == 1
    quick_start = [c for c in shell_commands(blocks("bash")[0]) if dsagen_argv(c)]
    assert [dsagen_argv(c)[0] for c in quick_start] == ["check", "generate", "bench", "tune", "bench"]


def test_python_blocks_run_top_to_bottom(monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "readme"}
    for n, body in enumerate(blocks("python")):
        exec(compile(body, f"README.md python block {n + 1}", "exec"), namespace)
    # the serving block's decode step and the training block's backward really ran
    step = namespace["step"]
    assert step.out.shape == (2, 2, 128, 512) and torch.isfinite(step.lse).all()
    assert step.slots.shape == (2, 2, 2048) and (step.slots >= 0).sum() > 0
    for name in ("q", "kv", "q_idx", "k_idx", "w"):
        grad = namespace[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_toml_block_is_a_valid_spec(tmp_path):
    import dsagen

    (path := tmp_path / "spec.toml").write_text(blocks("toml")[0])
    spec = dsagen.load_spec(path)
    assert spec.attention.qk_dim == 576 and spec.pinned("sparse_attention") == {"block_h": 64}


def test_the_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = blocks("bash")[1].strip()
    assert f'TEST_COMMAND="{command}"' in ci


def _options_of(argv: list[str]) -> set[str]:
    return {w.split("=")[0] for w in argv if w.startswith("--")}


def _help_text(command: list[str]) -> str:
    from typer.testing import CliRunner

    from dsagen.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "300", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_dsagen_command_line_names_real_options():
    """Blocks that need a GPU cannot run here; their options must still exist as written."""
    seen = 0
    for block in blocks("bash"):
        for command in shell_commands(block):
            argv = dsagen_argv(command)
            if argv is None:
                continue
            subcommand = argv[:2] if argv[0] == "db" else argv[:1]
            help_text = _help_text(subcommand)
            for option in _options_of(argv):
                assert option in help_text, f"{command!r}: {option} is not an option of dsagen {' '.join(subcommand)}"
            seen += 1
    assert seen >= 7


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path):
    """The quick start's dsagen commands, in a fresh cache: check, generate, bench before the tune,
    tune, bench after it. The tune keeps a winner only if it beat the schedule the build ran before."""
    import dsagen

    pytest.importorskip("tvm")
    commands = [c for c in shell_commands(blocks("bash")[0]) if dsagen_argv(c)]
    work = tmp_path / "work"
    work.mkdir()
    (work / "specs").symlink_to(ROOT / "specs")
    env = {**os.environ, "DSAGEN_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    outputs = []
    for command in commands:
        argv = [sys.executable, str(ROOT / "cli.py"), *dsagen_argv(command)]
        done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout)
    assert sorted(p.name for p in (work / "generated").iterdir())
    bench_before, tune, bench_after = outputs[2], outputs[3], outputs[4]
    for kernel in dsagen.ops.stages():
        assert kernel in bench_before and kernel in bench_after and kernel in tune
