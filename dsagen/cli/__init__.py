"""The `dsagen` command (console entry point `dsagen.cli:main`): a thin typer layer over the API.

typer is imported here and nowhere else in dsagen, so `import dsagen` never needs it.
"""
from .app import app, main

__all__ = ["app", "main"]
