"""The `dsagen` command from a checkout, without installing: `python cli.py ...`.

A thin script over `dsagen.cli` (the installed console entry point is `dsagen.cli:main`); the wheel
does not ship it.
"""
from __future__ import annotations

import sys

from dsagen.cli import app, main  # noqa: F401  (app: for typer's test runner)

if __name__ == "__main__":
    sys.exit(main())
