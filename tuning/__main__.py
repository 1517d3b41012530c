"""``python -m tuning tune ...``: the tune command on its own, for a subprocess that must not depend on the wiring
of the top-level ``aipd`` app."""

from __future__ import annotations

import typer

from tuning.cli import register

app = typer.Typer(pretty_exceptions_enable=False, no_args_is_help=True)
register(app)


@app.callback()
def _group() -> None:
    """Hyperparameter search (the same command as `aipd tune`)."""


if __name__ == "__main__":
    app()
