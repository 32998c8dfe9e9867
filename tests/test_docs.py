"""The docs name only files that exist in the repository: a file outside it, or one since moved or
deleted, sends a reader nowhere."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "autotune_db").glob("*.md"),
               *(ROOT / "benchmarks" / "results").rglob("README.md")])
FILE_ENDINGS = (".json", ".py", ".md", ".toml", ".log", ".txt", ".sh", ".j2", ".journal", ".png")
# a path as the docs write one: in backticks, or alone in parentheses
NAMED = re.compile(r"`([^`\s]+)`|\(([\w./-]+)\)")


def named_files(text: str) -> list[str]:
    """Relative file paths a doc names (a folder and a file name), placeholders left out."""
    names = (m.group(1) or m.group(2) for m in NAMED.finditer(text))
    return [name for name in names
            if "/" in name and name.endswith(FILE_ENDINGS)
            and not name.startswith(("http", "/", "~", "path/to/")) and not set(name) & set("<>*{}$=")]


def missing_files(doc: Path, text: str) -> list[str]:
    """The named files found neither from the repository root nor from the doc's folder or one of
    its subfolders (a results README names each record's files from the record's folder)."""
    bases = [ROOT, doc.parent, *(p for p in doc.parent.iterdir() if p.is_dir())]
    return [name for name in named_files(text) if not any((base / name).is_file() for base in bases)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_a_doc_names_exists(doc):
    assert missing_files(doc, doc.read_text()) == []


def test_a_file_outside_the_repository_is_caught():
    doc = ROOT / "benchmarks" / "results" / "README.md"
    text = ("Shapes of (shared/targets/h200.json); `h200-2026-11-29/versions.txt`, `docs/tvm.md`, "
            "`templates/triton/topk.py.j2`, 4.1 TB/s, `DSAGEN_OPS=path/op.py`, `path/to/file.journal`")
    assert missing_files(doc, text) == ["shared/targets/h200.json"]
