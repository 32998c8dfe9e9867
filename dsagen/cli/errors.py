"""Shared by every `dsagen` command: dsagen's errors become one `error:` line on stderr and exit 1,
text from files reaches the terminal escaped, and a closed pipe (`dsagen check ... | head -1`)
ends the command quietly."""
from __future__ import annotations

import functools
import os
import sys
import unicodedata

import typer


def printable(text: str) -> str:
    """`text` with control and format characters escaped (\\x1b, \\n, \\u202e...), so a spec's name
    cannot move the cursor, recolour the terminal or fake an `error:` line."""
    out = []
    for ch in str(text):
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        elif ch == "\\":
            out.append("\\\\")
        else:
            out.append(ch)
    return "".join(out)


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _quiet_broken_pipe() -> None:
    """The reader went away: stop writing, and keep Python from complaining at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    raise typer.Exit(0)


def friendly_errors(fn):
    """Turn dsagen's errors (and unreadable files, bad values) into one line on stderr and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..errors import DsagenError

        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except RecursionError:
            fail("the input is nested too deeply to read")
        except (DsagenError, ValueError, OSError) as exc:
            fail(printable(str(exc)))

    return wrapper
