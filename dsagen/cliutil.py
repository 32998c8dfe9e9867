"""Shared by every `dsagen` command: dsagen's own errors become one line on stderr and exit 1."""
from __future__ import annotations

import functools

import typer


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def friendly_errors(fn):
    """Turn dsagen's errors (and unreadable files, bad values) into one line on stderr and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import DsagenError

        try:
            return fn(*args, **kwargs)
        except (DsagenError, ValueError, OSError) as exc:
            fail(str(exc))

    return wrapper
