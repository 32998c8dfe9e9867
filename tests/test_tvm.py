"""The TVM backend beyond the shared kernel tests: Triton/TVM parity, the compiled-library cache,
modules that import alone, the sm_90 CUDA source (compiled with nvcc when present), and real
CPU tuning of a TVM kernel."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli
from dsagen.ops import get_op
import dsagen
from dsagen import reference
from dsagen.backends import tvm as tvm_backend
from dsagen.backends.triton import interpreter_problem
from dsagen.gpus import cpu_type
from dsagen.schedule import load_space
from dsagen import db as tuning_db
from dsagen.verify import assert_close, assert_topk

pytestmark = pytest.mark.skipif(tvm_backend.available() is not None, reason=str(tvm_backend.available()))

ROOT = Path(__file__).resolve().parent.parent
V32 = dsagen.load_spec(ROOT / "specs" / "deepseek_v32.toml")
V32_TVM_KERNELS = [op.name for op in dsagen.ops.enabled(V32, "tvm")]  # what a TVM build of V3.2 offers


def small_spec(**attention) -> dsagen.Spec:
    return dsagen.Spec(indexer=dsagen.IndexerSpec(heads=5, head_dim=40, dtype="fp8_e4m3"),
                       topk=dsagen.TopKSpec(k=13),
                       attention=dsagen.AttentionSpec(heads=6, qk_dim=72, v_dim=64, **attention))


def test_triton_and_tvm_agree_on_the_same_inputs(device, gen):
    """Both backends on the test device (Triton interpreter and TVM llvm on the CPU, Triton and TVM
    cuda on a GPU), one set of inputs: the indexer's logits, the selected values and attention's
    outputs agree with each other (and with the float64 reference)."""
    if device.type == "cpu" and (problem := interpreter_problem()):
        pytest.skip(problem)
    spec = small_spec()
    tri, tvm = dsagen.build(spec, backend="triton"), dsagen.build(spec, backend="tvm")
    S, SKV = 11, 150
    q = (torch.randn(S, 5, 40, generator=gen) * 3).to(torch.float8_e4m3fn).to(device)
    k = (torch.randn(SKV, 40, generator=gen) * 3).to(torch.float8_e4m3fn).to(device)
    k_scale, w = (torch.rand(SKV, generator=gen) + 0.5).to(device), torch.randn(S, 5, generator=gen).to(device)
    ks = torch.zeros(S, dtype=torch.int32, device=device)
    ke = torch.arange(SKV - S + 1, SKV + 1, dtype=torch.int32, device=device)
    logits = [b.indexer(q, k, k_scale, w, ks, ke) for b in (tri, tvm)]
    assert_close("indexer.logits.fp8_e4m3", logits[1], logits[0].double())
    picks = [b.topk(logits[0], ks, ke) for b in (tri, tvm)]
    for p in picks:
        assert_topk(p, logits[0], ks, ke, 13)
    qa = torch.randn(S, 6, 72, generator=gen).bfloat16().to(device)
    kv = torch.randn(SKV, 72, generator=gen).bfloat16().to(device)
    outs = [b.sparse_attention(qa, kv, picks[0]) for b in (tri, tvm)]
    assert_close("sparse_attention.out", outs[1][0], outs[0][0].double())
    assert_close("sparse_attention.lse", outs[1][1], outs[0][1].double())
    ref_out, ref_lse = reference.sparse_attention(qa, kv, picks[0], spec.attention.softmax_scale, 64)
    assert_close("sparse_attention.out", outs[1][0], ref_out)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("gcc")), reason="no C compiler to link libraries")
def test_compiled_library_is_cached_on_disk_and_reused(tmp_path, monkeypatch, child_env):
    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(tmp_path))
    kernels = dsagen.build(small_spec(), backend="tvm")
    x = torch.randn(3, 40)
    ks, ke = torch.zeros(3, dtype=torch.int32), torch.full((3,), 40, dtype=torch.int32)
    kernels.topk(x, ks, ke)
    path = kernels.path(kernels.resolve("topk", 3, 40, "cpu"))
    [lib] = path.parent.glob(f"{path.stem}.llvm-*.so")
    # a fresh process loads the library instead of compiling (build() would raise)
    code = ("import sys, torch; from dsagen.backends import tvm as b; m = b.load(__import__('pathlib').Path(sys.argv[1]));"
            "m.build = lambda kind: (_ for _ in ()).throw(RuntimeError('compiled again'));"
            "x = torch.randn(3, 40); print(m.topk(x, torch.zeros(3, dtype=torch.int32), torch.full((3,), 40, "
            "dtype=torch.int32))[0].tolist())")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          env=child_env)
    assert proc.returncode == 0, proc.stderr
    # a truncated library is rebuilt, not trusted
    lib.write_bytes(b"not a library")
    tvm_backend._LOADED.clear()
    fresh = dsagen.build(small_spec(), backend="tvm")
    assert_topk(fresh.topk(x, ks, ke), x, ks, ke, 13)


def test_generated_tvm_modules_import_alone(tmp_path):
    result = CliRunner().invoke(cli.app, ["generate", str(ROOT / "specs" / "deepseek_v32.toml"), "-o", str(tmp_path),
                                          "--backend", "tvm"])
    assert result.exit_code == 0, result.output
    files = sorted(tmp_path.glob("tvm_*.py"))
    assert len(files) == len(V32_TVM_KERNELS)  # one module per kernel the build offers
    for path in files:
        code = f"import importlib.util as u; s = u.spec_from_file_location('m', {str(path)!r}); m = u.module_from_spec(s); " \
               "s.loader.exec_module(m); assert callable(m.build)"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "import dsagen" not in path.read_text() and "from dsagen" not in path.read_text()


@pytest.mark.parametrize("kernel", dsagen.ops.stages())
def test_cuda_source_for_sm90(kernel, tmp_path):
    """TVM generates the CUDA kernel of each stage's template without a GPU; nvcc compiles it for
    sm_90 when it is installed. (The attention backward's TVM kernel is llvm only; the decode
    kernels: tests/test_tvm_decode.py.)"""
    built = dsagen.build(V32, backend="tvm")
    path = built.path(built.resolve(kernel, device_type="cpu"))
    source = tvm_backend.cuda_source(path)
    assert '__global__' in source and 'extern "C"' in source
    nvcc_compiles(source, tmp_path, kernel)


def nvcc_compiles(source: str, tmp_path: Path, name: str) -> None:
    """nvcc compiles TVM's CUDA source to an sm_90 object (when nvcc is installed)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    cu = tmp_path / f"{name}.cu"
    cu.write_text(source)
    proc = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", str(cu), "-o", str(tmp_path / f"{name}.o")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_tvm_cpu_kernels_tune_for_real(tmp_path, monkeypatch):
    """Without a GPU, dsagen tune --backend tvm times the llvm kernels and records cpu-<arch>.json;
    a build on the CPU then uses the winner."""
    monkeypatch.setenv("DSAGEN_CACHE_DIR", str(tmp_path / "cache"))
    spec_file = tmp_path / "small.toml"
    spec_file.write_text('[indexer]\nheads = 5\nhead_dim = 40\ndtype = "fp8_e4m3"\n[topk]\nk = 13\n'
                         '[attention]\nheads = 6\nqk_dim = 72\nv_dim = 64\ndtype = "bf16"\n')
    # one trial: the study's first point, the default builds run, is its winner and recorded without a
    # duel (with more, the database gets the winner only if it beats the default in their duel)
    result = CliRunner().invoke(cli.app, ["tune", str(spec_file), "--backend", "tvm", "--device", "cpu", "-k", "topk",
                                          "--S", "16", "--SKV", "500", "--trials", "1", "-q"])
    assert result.exit_code == 0, result.output
    db_file = tuning_db.db_path(cpu_type())
    [entry] = tuning_db.load(db_file).entries.values()
    assert entry.backend == "tvm" and entry.kernel == "topk" and entry.compute_capability == "cpu"
    assert entry.ms > 0 and entry.trials == 1
    assert entry.pct_of_roofline is None  # a roofline floor is a GPU's
    space = load_space("tvm", "topk")
    for name, value in entry.schedule.items():  # only CPU knobs were tuned
        if name.startswith("cuda_"):
            assert value == space.knobs[name].default
    kernels = dsagen.build(dsagen.load_spec(spec_file), backend="tvm")
    info = kernels.explain(16, 500, device_type="cpu")["topk"]
    assert info["source"].startswith("tuned (exact bucket S16-SKV512)") and info["schedule"] == entry.schedule
    assert json.loads(json.dumps(info))  # plain data


def cpu_points(spec: dsagen.Spec, kernel: str, around: dict | None = None) -> list[dict]:
    """Three legal CPU schedules far apart (first, middle, last of the legal grid), the CUDA knobs
    held fixed at their values in `around` (default: their defaults)."""
    from dsagen.gpus import get_gpu
    from dsagen.plan import problem_symbols
    from dsagen.tuning.study import fixed_knobs

    space = load_space("tvm", kernel)
    fixed = fixed_knobs(space, "cpu", around)
    legal = [p for p in space.legal_points(problem_symbols(spec, get_op(kernel), get_gpu("nvidia-h200")))
             if all(p[k] == v for k, v in fixed.items())]
    return [legal[0], legal[len(legal) // 2], legal[-1]]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["first", "middle", "last"])
@pytest.mark.parametrize("kernel", dsagen.ops.stages())
def test_cpu_schedules_far_apart_agree_with_the_reference(kernel, which, gen):
    spec = dsagen.Spec(indexer=dsagen.IndexerSpec(heads=16, head_dim=128, dtype="fp8_e4m3"),
                       topk=dsagen.TopKSpec(k=100),
                       attention=dsagen.AttentionSpec(heads=40, qk_dim=576, v_dim=512))
    point = cpu_points(spec, kernel)[which]
    kernels = dsagen.build(spec, backend="tvm", schedules={kernel: point})
    assert kernels.resolve(kernel, device_type="cpu").point == point
    S, SKV = 7, 1031
    ks = torch.randint(0, SKV // 2, (S,), generator=gen).int()
    ke = (ks + torch.randint(0, SKV, (S,), generator=gen)).clamp(max=SKV).int()
    if kernel == "indexer":
        q = (torch.randn(S, 16, 128, generator=gen) * 2).to(torch.float8_e4m3fn)
        k = (torch.randn(SKV, 128, generator=gen) * 2).to(torch.float8_e4m3fn)
        w, scale = torch.randn(S, 16, generator=gen), torch.rand(SKV, generator=gen) + 0.5
        got = kernels.indexer(q, k, scale, w, ks, ke, out=torch.full((S, SKV), float("nan")))
        assert_close("indexer.logits.fp8_e4m3", got, reference.indexer(q, k, scale, w, ks, ke))
    elif kernel == "topk":
        x = torch.randint(-5, 5, (S, SKV), generator=gen).float()  # heavy ties
        assert_topk(kernels.topk(x, ks, ke, out=torch.full((S, 100), -7, dtype=torch.int32)), x, ks, ke, 100)
    else:
        q = torch.randn(S, 40, 576, generator=gen).bfloat16()
        kv = torch.randn(SKV, 576, generator=gen).bfloat16()
        idx = torch.randint(-3, SKV + 3, (S, 100), generator=gen).int()
        idx[0] = -1  # an all-invalid row
        out, lse = kernels.sparse_attention(q, kv, idx, out=torch.full((S, 40, 512), float("nan")).bfloat16(),
                                            lse=torch.full((S, 40), float("nan")))
        ref_out, ref_lse = reference.sparse_attention(q, kv, idx, spec.attention.softmax_scale, 512)
        assert_close("sparse_attention.out", out, ref_out)
        assert_close("sparse_attention.lse", lse, ref_lse)


def test_target_argument_is_checked():
    with pytest.raises(ValueError, match="target='rocm' for backend='tvm': allowed llvm, cuda"):
        dsagen.build(small_spec(), backend="tvm", target="rocm")
    kernels = dsagen.build(small_spec(), backend="tvm", target="cuda")
    x = torch.randn(2, 30)
    with pytest.raises(ValueError, match="built with target='cuda' but got cpu tensors"):
        kernels.topk(x, torch.zeros(2, dtype=torch.int32), torch.full((2,), 30, dtype=torch.int32))
    llvm = dsagen.build(small_spec(), backend="tvm", target="llvm")
    assert_topk(llvm.topk(x, torch.zeros(2, dtype=torch.int32), torch.full((2,), 30, dtype=torch.int32)),
                x, torch.zeros(2, dtype=torch.int32), torch.full((2,), 30, dtype=torch.int32), 13)
