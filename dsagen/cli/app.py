"""The typer application: every command, and the entry point."""
from __future__ import annotations

import typer

from . import inspect, run

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="dsagen: compile a DeepSeek Sparse Attention spec (TOML) into tuned Triton or TVM kernels "
         "(--backend triton|tvm), for CUDA GPUs and CPUs.",
)
inspect.register(app)
run.register(app)


def _register_db() -> None:
    from .db import db_app

    app.add_typer(db_app, name="db")


_register_db()


def main() -> int:
    app()
    return 0
