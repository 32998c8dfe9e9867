"""The pipeline's shape is the code's: spec -> plan -> resolve -> lower -> render -> compile/load
-> run, with no import circle among dsagen's modules, op modules that never import the package
that discovers them, and a run path that never imports a workload module."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import dsagen

PACKAGE = Path(dsagen.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(name: str) -> set[str]:
    """The dsagen modules `name` imports anywhere in its text (functions included): `from X import
    y` counts as an import of X.y where that is a module, else of X."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names}
    return {m for m in found if m in MODULES and m != name}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_among_dsagens_modules():
    graph = {name: imported(name) for name in MODULES}
    assert circles(graph) == []
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]  # the check works


def test_the_steps_import_only_earlier_ones():
    """spec is plain data; plan knows no op registry; resolve decides a schedule and neither lowers
    nor renders; lower comes before render."""
    assert not {m for m in imported("dsagen.spec") if m.startswith("dsagen.ops")}
    assert imported("dsagen.plan") == set()
    assert not imported("dsagen.resolve") & {"dsagen.lower", "dsagen.codegen", "dsagen.backends",
                                              "dsagen.backends.source_cache"}
    assert "dsagen.codegen" not in imported("dsagen.lower")


def test_no_op_module_imports_the_package_that_discovers_it():
    for name in MODULES:
        if name.startswith("dsagen.ops.") and name != "dsagen.ops.__init__":
            assert "dsagen.ops" not in imported(name), f"{name} imports dsagen.ops (its package's __init__)"


def test_a_cpu_run_imports_no_workload_module(tmp_path):
    code = """
import sys, torch, dsagen
spec = dsagen.Spec(indexer=dsagen.IndexerSpec(heads=2, head_dim=16, dtype="bf16"), topk=dsagen.TopKSpec(k=4),
                   attention=dsagen.AttentionSpec(heads=2, qk_dim=48, v_dim=32))
kernels = dsagen.build(spec)
logits = torch.randn(3, 20)
ks, ke = torch.zeros(3, dtype=torch.int32), torch.full((3,), 20, dtype=torch.int32)
out = kernels.topk(logits, ks, ke)
assert out.shape == (3, 4), out.shape
buffer = torch.full((3, 4), -7, dtype=torch.int32)
assert kernels.topk(logits, ks, ke, out=buffer) is buffer and torch.equal(buffer.sort(1).values, out.sort(1).values)
loaded = sorted(m for m in sys.modules if m.startswith("dsagen") and
                (m.endswith("_workload") or m in ("dsagen.workloads", "dsagen.ops.workload", "dsagen.verify",
                                                  "dsagen.reference", "dsagen.tuning", "dsagen.bench")))
print(",".join(loaded))
"""
    env = {k: v for k, v in os.environ.items() if k != "DSAGEN_OPS"} | {"DSAGEN_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
