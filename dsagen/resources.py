"""Where the shipped data lives: templates/, schedules/, autotune_db/.

In a source checkout they sit at the repository root; in an installed wheel they are packed under
dsagen/_data/ (see pyproject.toml). Both layouts resolve through data_dir().
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Path of one shipped data folder ('templates', 'schedules' or 'autotune_db')."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"dsagen data folder {name!r} not found beside {_PACKAGE}")
