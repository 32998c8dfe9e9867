"""The `dsagen` command (cli.app through typer's CliRunner) and the generated-module cache.

Generated modules are imported in fresh interpreters here, so a module that only works inside the
process that rendered it (or that needs dsagen at import time) fails.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
import dsagen

ROOT = Path(__file__).resolve().parent.parent
V32 = ROOT / "specs" / "deepseek_v32.toml"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(cli.app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})
    result.plain = ANSI.sub("", result.output)  # type: ignore[attr-defined]
    return result


def section(text: str, kernel: str) -> str:
    """The lines `check` prints under [kernel]."""
    return text.split(f"[{kernel}]", 1)[1].split("\n[", 1)[0]


def seen_gpu():
    """(GPU type, compute capability, GPU whose limits apply) of a command run without --gpu: the
    GPU torch sees, else the H200 of the shipped database, as dsagen.resolve decides."""
    from dsagen.gpus import GPUS
    from dsagen.resolve import DEFAULT_GPU, gpu_context

    gpu_type, cc = gpu_context(None, default=DEFAULT_GPU)
    target = GPUS.get(gpu_type, GPUS[DEFAULT_GPU])
    return gpu_type, cc or "{}.{}".format(*target.compute_capability), target


# ------------------------------------------------------------------------------------------------
# --help

def test_app_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for command in ("check", "generate", "show"):
        assert re.search(rf"\b{command}\b", result.plain), command


def test_no_arguments_shows_help():
    result = invoke()
    assert "check" in result.plain and "Usage" in result.plain


@pytest.mark.parametrize("command,options", [
    pytest.param("check", ("--S", "--SKV", "--gpu", "--window"), id="check"),
    pytest.param("generate", ("--out", "-o", "--gpu"), id="generate"),
    pytest.param("show", ("--kernel", "-k", "--gpu"), id="show"),
])
def test_command_help_mentions_its_options(command, options):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "SPEC" in result.plain
    for option in options:
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", result.plain), option


# ------------------------------------------------------------------------------------------------
# check

@pytest.fixture(scope="module")
def v32_check():
    result = invoke("check", V32, "--S", "4096", "--SKV", "32768", "--window", "causal")
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.stdout)  # stderr may hold a note on whose schedules these are


def test_check_says_valid_and_prints_the_spec(v32_check):
    assert v32_check.startswith(f"spec {V32}: valid (semantic hash ")
    assert "indexer   heads=64 head_dim=128 dtype=fp8_e4m3" in v32_check
    assert "topk      k=2048" in v32_check
    assert "attention heads=128 qk_dim=576 v_dim=512 dtype=bf16 sm_scale=0.13523" in v32_check
    assert "problem: S=4096 SKV=32768" in v32_check and "(causal)" in v32_check


def test_check_indexer_flops(v32_check):
    assert re.search(r"FLOPs\s+= 16384\*S\*W\s+-> 2\.062e\+12\n", section(v32_check, "indexer"))


def test_check_sparse_attention_floor_on_the_gpu_seen(v32_check):
    """2 * S * k * heads * (qk_dim + v_dim) FLOPs at the bf16 peak of the GPU type `check` plans for
    (the one torch sees, else the H200: 3.09 ms there); the gathered rows are far below the memory roof."""
    from dsagen.gpus import GPUS

    _, _, target = seen_gpu()
    flops = 2 * 4096 * 2048 * 128 * (576 + 512)
    assert flops / (GPUS["nvidia-h200"].bf16_tflops * 1e9) == pytest.approx(3.09, abs=0.005)
    text = section(v32_check, "sparse_attention")
    floor = re.search(rf"roofline floor on {re.escape(target.name)}: ([0-9.]+) ms \((\w+)-bound\)", text)
    assert floor, text
    assert float(floor.group(1)) == pytest.approx(flops / (target.bf16_tflops * 1e9), abs=0.005)
    assert floor.group(2) == "compute"


@pytest.mark.parametrize("kernel,constraints", [
    pytest.param("indexer", ("dot_rows_at_least_16", "dot_rows_at_most_256", "head_block_within_heads",
                             "shared_memory", "registers"), id="indexer"),
    pytest.param("topk", ("shared_memory", "registers"), id="topk"),
    pytest.param("sparse_attention", None, id="sparse_attention"),  # its resolved variant's own constraints
])
def test_check_prints_schedule_footprint_and_constraints(v32_check, kernel, constraints):
    """The schedule a build on the GPU seen (else the H200) resolves, with its source: the shipped
    H200 entries answer the H200 and every GPU type of its compute capability (the H100)."""
    from dsagen import load_spec
    from dsagen.resolve import Resolver

    gpu_type, cc, target = seen_gpu()
    from dsagen.schedule import load_space

    hit = Resolver(load_spec(V32), "triton", gpu_type, cc).resolve(kernel, 4096, 32768, "cuda")
    text = section(v32_check, kernel)
    variant = f"  variant: {hit.variant}\n" if hit.variant is not None else ""
    assert f"{variant}  schedule: {hit.point}\n  from: {hit.source}\n" in text, text
    if constraints is None:
        constraints = tuple(load_space("triton", kernel, hit.variant).constraints)
        assert constraints, kernel
    if gpu_type == "nvidia-h200":
        assert re.search(r"from: tuned \((exact|nearest) bucket .*nvidia-h200\.json\n", text), text
    elif cc == "9.0":
        assert re.search(r"from: tuned on nvidia-h200 \(same compute capability 9\.0, .*nvidia-h200\.json\n", text)
    assert "footprint: smem_bytes=" in text and f"(smem limit {target.smem_per_block})" in text
    for name in constraints:
        assert re.search(rf"constraint {name}: .*\[ok\]", text), name
    assert "VIOLATED" not in text
    assert re.search(r"legal points in the search space: \d+ of \d+", text)


def test_check_full_window_uses_skv():
    result = invoke("check", V32, "--S", "4096", "--SKV", "32768", "--window", "full")
    assert result.exit_code == 0, result.output
    assert "mean indexer window W=32768 (full)" in result.plain
    assert "-> 2.199e+12" in section(result.plain, "indexer")  # 2 * 4096 * 32768 * 64 * 128


def test_check_other_gpu_moves_an_illegal_default():
    result = invoke("check", V32, "--gpu", "nvidia-a100")
    assert result.exit_code == 0, result.output
    text = section(result.plain, "sparse_attention")
    assert "roofline floor on nvidia-a100" in text
    assert "from: default (nearest legal)" in text  # 229 KB of smem does not fit an A100
    assert "VIOLATED" not in text


# ------------------------------------------------------------------------------------------------
# generate / show

IMPORT_ALONE = """
import importlib.util, sys
path, kernel = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("vendored_kernel", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert callable(getattr(module, kernel)), kernel
assert callable(module.compile_signature)
assert not [m for m in sys.modules if m.split(".")[0] in ("dsagen", "cli")], "imports dsagen"
print("ok", kernel)
"""


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("generated")
    result = invoke("generate", V32, "-o", out)
    assert result.exit_code == 0, result.output
    return out, result.plain


# what generate writes for V3.2 (one module per kernel its Triton build offers), longest name first
KERNELS = tuple(sorted((op.name for op in dsagen.ops.enabled(dsagen.load_spec(V32), "triton")), key=len, reverse=True))


def kernel_of(file_name: str) -> str:
    return next(k for k in KERNELS if file_name.startswith(k + "_"))


def test_generate_writes_a_module_per_kernel(generated):
    out, text = generated
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == len(KERNELS) and all(f.endswith(".py") for f in files), files
    assert sorted(kernel_of(f) for f in files) == sorted(KERNELS)
    for kernel in KERNELS:
        assert re.search(rf"^{kernel}: {re.escape(str(out))}/{kernel}_\S+\.py  \(schedule \{{.*\}}, from ", text, re.M)


def test_generated_modules_import_alone_in_fresh_interpreters(generated, tmp_path):
    out, _ = generated
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"}  # no __pycache__ beside the files
    procs = {}
    for path in sorted(out.glob("*.py")):
        kernel = kernel_of(path.name)
        procs[kernel] = subprocess.Popen(
            [sys.executable, "-c", IMPORT_ALONE, str(path), kernel], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for kernel, proc in procs.items():
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{kernel}:\n{output}"
        assert f"ok {kernel}" in output


def test_generate_twice_writes_identical_files(generated, tmp_path):
    out, _ = generated
    for again in (out, tmp_path / "again"):
        result = invoke("generate", V32, "--out", again)
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in again.glob("*.py")) == sorted(p.name for p in out.glob("*.py"))
        for path in out.glob("*.py"):
            assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_generated_file_names_follow_the_content(generated, tmp_path):
    """The softmax scale is a run-time argument: a different sm_scale changes no module; a different
    head count changes the attention modules' names and keys (forward and backward), and only those."""
    out, _ = generated
    spec = tmp_path / "scaled.toml"
    spec.write_text(V32.read_text().replace("sm_scale = 0.13523", "sm_scale = 0.125"))
    result = invoke("generate", spec, "-o", tmp_path / "scaled")
    assert result.exit_code == 0, result.output
    before = {p.name for p in out.glob("*.py")}
    after = {p.name for p in (tmp_path / "scaled").glob("*.py")}
    assert after == before
    spec.write_text(V32.read_text().replace("heads = 128", "heads = 96"))
    result = invoke("generate", spec, "-o", tmp_path / "heads")
    assert result.exit_code == 0, result.output
    changed = sorted({p.name for p in (tmp_path / "heads").glob("*.py")} - before)
    assert sorted(name.split("_h96_")[0] for name in changed) == reading_fields_that_differ(V32, spec), changed
    assert {"sparse_attention", "sparse_attention_bwd"} <= set(reading_fields_that_differ(V32, spec))


def reading_fields_that_differ(a: Path, b: Path) -> list[str]:
    """The offered kernels whose math reads a field in which specs a and b differ."""
    spec_a, spec_b = dsagen.load_spec(a), dsagen.load_spec(b)
    return sorted(op.name for op in dsagen.ops.enabled(spec_a, "triton")
                  if op.semantic_fields(spec_a) != op.semantic_fields(spec_b))


def test_generated_source_matches_show(generated):
    out, _ = generated
    result = invoke("show", V32, "--kernel", "sparse_attention")
    assert result.exit_code == 0, result.output
    (path,) = [p for p in out.glob("sparse_attention_*.py") if kernel_of(p.name) == "sparse_attention"]
    assert result.stdout == path.read_text()


def test_show_prints_the_topk_source():
    result = invoke("show", V32, "--kernel", "topk")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# Generated by dsagen")
    assert "# kernel:   topk (backend: triton, template: topk.py.j2)" in result.stdout
    assert "\ndef topk(" in result.stdout


def test_show_short_kernel_option():
    result = invoke("show", V32, "-k", "indexer")
    assert result.exit_code == 0, result.output
    assert "\ndef indexer(" in result.stdout


# ------------------------------------------------------------------------------------------------
# errors: one line, exit status 1 (2 for usage)

def assert_one_error_line(result, *needles: str, stdout_empty: bool = True) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in ANSI.sub("", result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    if stdout_empty:
        assert result.stdout == "", result.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


BAD_SPECS = {
    "invalid-toml": ("[indexer\nheads = 64\n", "not valid TOML"),
    "typo-key": ("TYPO", "unknown key indexer.haeds"),
    "bad-value": ("[indexer]\nheads = 0\nhead_dim = 1\ndtype = 'bf16'\n[topk]\nk = 1\n"
                  "[attention]\nheads = 1\nqk_dim = 1\nv_dim = 1\ndtype = 'bf16'\n", "indexer.heads=0"),
    "missing-section": ("name = 'x'\n", "missing section [indexer]"),
    "illegal-pinned-schedule": ("PIN", "breaks shared_memory"),
}


@pytest.mark.parametrize("command", ["check", "generate", "show"])
@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_file_is_one_error_line(tmp_path, command, case):
    text, needle = BAD_SPECS[case]
    if text == "TYPO":
        text = V32.read_text().replace("heads = 64", "haeds = 64")
    elif text == "PIN":
        text = V32.read_text() + "\n[schedule.sparse_attention]\nblock_h = 128\nblock_n = 128\nnum_stages = 3\n"
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    extra = {"check": [], "generate": ["-o", tmp_path / "out"], "show": ["--kernel", "sparse_attention"]}[command]
    # every command fails before printing anything (check chooses all schedules first)
    line = assert_one_error_line(invoke(command, path, *extra), needle, stdout_empty=True)
    if case != "illegal-pinned-schedule":
        assert str(path) in line
    if command == "generate":
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_missing_spec_file_is_one_error_line(tmp_path):
    assert_one_error_line(invoke("check", tmp_path / "absent.toml"), "cannot read spec file", "absent.toml")


@pytest.mark.parametrize("command", ["check", "generate", "show"])
def test_unknown_gpu_is_one_error_line(tmp_path, command):
    extra = {"check": [], "generate": ["-o", tmp_path / "out"], "show": ["--kernel", "topk"]}[command]
    assert_one_error_line(invoke(command, V32, "--gpu", "nvidia-h300", *extra),
                          "unknown GPU 'nvidia-h300'", "known GPUs are nvidia-h200")


def test_unknown_kernel_is_a_usage_error():
    result = invoke("show", V32, "--kernel", "flash")
    assert result.exit_code == 2, result.output
    assert "flash" in result.plain and "sparse_attention" in result.plain
    assert "Traceback" not in result.plain


@pytest.mark.parametrize("args", [
    pytest.param(["check", str(V32), "--S", "0"], id="S-zero"),
    pytest.param(["check", str(V32), "--window", "sliding"], id="bad-window"),
    pytest.param(["generate", str(V32)], id="generate-without-out"),
    pytest.param(["show", str(V32)], id="show-without-kernel"),
    pytest.param(["frobnicate", str(V32)], id="unknown-command"),
])
def test_bad_usage_exits_2(args):
    result = invoke(*args)
    assert result.exit_code == 2, result.output


def test_error_in_a_real_process_has_no_traceback(tmp_path, child_env):
    """CliRunner would hide a traceback; run the script itself once."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[indexer\n")
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "check", str(bad)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env=child_env)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert ANSI.sub("", proc.stderr).startswith(f"error: {bad}: not valid TOML")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# the module cache (dsagen.backends.source_cache.materialize)

def topk_source():
    from dsagen import Spec
    from dsagen.kernels import resolve_kernel

    return resolve_kernel(Spec(), "topk").generated


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(folder))
    return folder


def test_cache_dir_follows_the_environment(cache, monkeypatch):
    from dsagen.fileio import cache_dir

    assert cache_dir() == cache
    monkeypatch.delenv("DSAGEN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache / "xdg"))
    assert cache_dir() == cache / "xdg" / "dsagen"


def test_materialize_twice_same_path_no_rewrite(cache):
    from dsagen.backends.source_cache import materialize

    gen = topk_source()
    first = materialize(gen)
    assert first == cache / "triton" / f"{gen.module_name}.py"
    assert first.read_text() == gen.source
    os.utime(first, ns=(1_000_000_000, 1_000_000_000))  # an old mtime a rewrite could not keep
    second = materialize(gen)
    assert second == first
    assert first.stat().st_mtime_ns == 1_000_000_000
    assert sorted(p.name for p in first.parent.iterdir() if p.suffix == ".py") == [first.name]


@pytest.mark.parametrize("damage", ["truncated", "edited", "empty"])
def test_corrupted_cache_file_is_rewritten(cache, damage):
    from dsagen.backends.source_cache import materialize

    gen = topk_source()
    path = materialize(gen)
    bad = {"truncated": gen.source[: len(gen.source) // 2], "edited": gen.source.replace("tl.", "tl_", 1),
           "empty": ""}[damage]
    path.write_text(bad)
    assert materialize(gen) == path
    assert path.read_text() == gen.source


def _materialize_in_child(gen, barrier, results):
    from dsagen.backends.source_cache import materialize

    barrier.wait(timeout=120)
    try:
        results.put(("ok", str(materialize(gen))))
    except BaseException as exc:  # report, don't hang the parent
        results.put(("error", repr(exc)))


@pytest.mark.parametrize("start", ["cold", "corrupted"])
def test_eight_processes_materialize_the_same_source(cache, start):
    from dsagen.backends.source_cache import materialize

    gen = topk_source()
    target = cache / "triton" / f"{gen.module_name}.py"
    if start == "corrupted":
        materialize(gen)
        target.write_text(gen.source[:100])
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_materialize_in_child, args=(gen, barrier, results)) for _ in range(8)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert outcomes == [("ok", str(target))] * 8, outcomes
    assert target.read_bytes() == gen.source.encode()
    leftovers = [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_module_key_covers_included_templates(tmp_path, monkeypatch):
    """A change in a template that another includes (_radix.j2 in topk) gives a new module key."""
    from dsagen.codegen import TEMPLATE_PATH_ENV
    from dsagen.kernels import resolve_kernel

    spec = dsagen_spec()
    before = resolve_kernel(spec, "topk").generated
    (tmp_path / "triton").mkdir()
    original = (ROOT / "templates" / "triton" / "_radix.j2").read_text()
    changed = original.replace("def _ordered_key(x):", "def _ordered_key(x):  # changed", 1)
    assert changed != original
    (tmp_path / "triton" / "_radix.j2").write_text(changed)
    monkeypatch.setenv(TEMPLATE_PATH_ENV, str(tmp_path))
    after = resolve_kernel(spec, "topk").generated
    assert after.key != before.key and "# changed" in after.source


def dsagen_spec():
    import dsagen

    return dsagen.load_spec(V32)


def test_decode_shapes_need_a_spec_with_a_cache():
    """--shapes decode defaults to the decode kernels; a spec without a [cache] section has none."""
    result = invoke("bench", "specs/deepseek_v32.toml", "--shapes", "decode", "--backend", "tvm", "--device", "cpu")
    assert result.exit_code != 0
    assert "--shapes decode times the decode kernels" in result.output and "[cache]" in result.output


# ------------------------------------------------------------------------------------------------
# kernels a spec's build does not offer, shapes no build runs, an output folder that is a file

@pytest.mark.parametrize("command", ["show", "bench", "tune"])
@pytest.mark.parametrize("kernel", ["sparse_decode", "paged_indexer"])
def test_a_decode_kernel_of_a_spec_without_a_cache_is_one_error_line(command, kernel):
    """The reason is the one the Python API gives when the kernel is called."""
    import dsagen
    from dsagen.errors import BackendError

    with pytest.raises(BackendError) as api:
        dsagen.build(dsagen.load_spec(V32)).run(kernel)
    extra = {"show": [], "bench": ["--S", "1", "--SKV", "64", "--backend", "tvm", "--device", "cpu"],
             "tune": ["--S", "1", "--SKV", "64", "--device", "cpu"]}[command]
    line = assert_one_error_line(invoke(command, V32, "--kernel", kernel, *extra), f"--kernel {kernel}: ",
                                 stdout_empty=command == "show")
    assert line.endswith(str(api.value)), (line, str(api.value))
    assert "[cache]" in line


def test_a_kernel_without_a_template_on_the_backend_is_one_error_line():
    assert_one_error_line(invoke("show", V32, "--kernel", "indexer_topk", "--backend", "tvm"),
                          "--kernel indexer_topk: indexer_topk has no tvm template (its backends: triton)")


def test_check_refuses_more_queries_than_keys_as_tune_and_bench_do():
    tuned = invoke("tune", V32, "--S", "8192", "--SKV", "4096", "--device", "cpu")
    assert tuned.exit_code == 1, tuned.output
    refusal = ANSI.sub("", tuned.stderr).strip()
    assert refusal.startswith("error: no shape with S <= SKV"), refusal
    assert_one_error_line(invoke("check", V32, "--S", "8192", "--SKV", "4096"), refusal.removeprefix("error: "))
    assert invoke("check", V32, "--S", "4096", "--SKV", "4096").exit_code == 0


def test_generate_into_a_file_names_out(tmp_path):
    occupied = tmp_path / "modules"
    occupied.write_text("mine")
    line = assert_one_error_line(invoke("generate", V32, "-o", occupied), "-o/--out", str(occupied), "is a file")
    assert "Errno" not in line
    assert occupied.read_text() == "mine"
    assert_one_error_line(invoke("generate", V32, "-o", occupied / "below"), "-o/--out", "cannot create the folder")


# ------------------------------------------------------------------------------------------------
# without a GPU and without --gpu the CUDA schedules are the default GPU type's: said on stderr

NO_GPU_NOTE = "note: no GPU seen: showing the schedules a build on nvidia-h200 would run"


@pytest.mark.parametrize("command,extra", [
    pytest.param("check", (), id="check"), pytest.param("explain", (), id="explain"),
    pytest.param("show", ("-k", "topk"), id="show"), pytest.param("generate", ("-o", "OUT"), id="generate"),
])
def test_without_a_gpu_the_output_says_whose_schedules_it_shows(command, extra, tmp_path, monkeypatch):
    import dsagen.resolve

    extra = [tmp_path / "out" if a == "OUT" else a for a in extra]
    monkeypatch.setattr(dsagen.resolve, "detected_gpu", lambda: None)
    result = invoke(command, V32, *extra)
    assert result.exit_code == 0, result.output
    assert ANSI.sub("", result.stderr).splitlines()[0].startswith(NO_GPU_NOTE), result.stderr
    assert "--gpu" in result.stderr and "--device cpu" in result.stderr
    assert NO_GPU_NOTE not in result.stdout
    for named in (["--gpu", "nvidia-h200"], ["--device", "cpu"]):
        assert NO_GPU_NOTE not in invoke(command, V32, *extra, *named).output, named
    monkeypatch.setattr(dsagen.resolve, "detected_gpu", lambda: ("nvidia-h100", "9.0"))
    seen = invoke(command, V32, *extra)
    assert seen.exit_code == 0, seen.output
    assert "no GPU seen" not in seen.output


def test_a_corrupt_cpu_database_leaves_gpu_builds_alone(tmp_path, monkeypatch):
    """A build for the H200 reads the H200's files (and those of its compute capability), never a
    CPU type's: a corrupt CPU file in the user's folder changes nothing there, and stays as it is."""
    from dsagen.gpus import cpu_type

    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "autotune_db"
    folder.mkdir()
    corrupt = folder / f"{cpu_type()}.json"
    corrupt.write_text('{"format": "dsagen-autotune-db",\n "version": oops\n')
    result = invoke("explain", V32, "--gpu", "nvidia-h200")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("from: tuned (exact bucket S4096-SKV32768)") == 4, result.stdout
    assert "warning" not in result.output.lower()
    cpu = invoke("explain", V32, "--backend", "tvm", "--device", "cpu")  # the CPU's own file: how to recover
    assert_one_error_line(cpu, f"{corrupt}:2: invalid JSON", "move it aside")
    assert corrupt.read_text() == '{"format": "dsagen-autotune-db",\n "version": oops\n'
