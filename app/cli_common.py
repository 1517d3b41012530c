"""What every `aipd` command shares: the consoles, the common options, error handling and the settings loader.

A leaf: stage CLIs (`training/cli.py`, `serving/cli.py`, ...) import this and nothing above it, and `aipd/cli.py`
attaches their Typer apps, so the wiring runs one way. Exit codes: 0 success, 2 bad usage (Typer), 1 a user error
printed as one line, 130 interrupted.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from app.config import Settings, load_settings
from app.errors import UserError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML settings file (below AIPD_* env vars and flags).")
AddressOpt = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local one).")

# Errors that name a file the user gave; the rest of the user's errors inherit from UserError.
_USER_OS_ERRORS = (FileNotFoundError, PermissionError)


def new_app(**options: Any) -> typer.Typer:
    """A Typer app with the project's conventions: -h, no pretty tracebacks, help when called bare."""
    options.setdefault("no_args_is_help", True)
    return typer.Typer(
        pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]}, **options
    )


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one error line on stderr and exit."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def handle_errors(func: F) -> F:
    """A user's error becomes one line and exit code 1, Ctrl-C exit code 130; a bug keeps its traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except ValidationError as err:
            fail(f"invalid settings: {err}")
        except (UserError, *_USER_OS_ERRORS) as err:
            fail(str(err))

    return wrapper  # type: ignore[return-value]


class _Invocation:
    """What the root command's options say for the whole invocation (`aipd --verbose train ...`)."""

    verbose: bool = False


invocation = _Invocation()


def settings_from(config: Optional[Path], **overrides: Any) -> Settings:
    """The settings for one command (defaults, file, environment, then these flags), with logging set up: the
    terminal quiet unless verbose, the whole log in the work directory."""
    from app.logging import configure_logging

    if invocation.verbose:
        overrides["verbose"] = True
    settings = load_settings(config, **overrides)
    configure_logging(
        settings.log_format, settings.log_level, log_file=settings.log_file.resolve(), quiet=not settings.verbose
    )
    return settings
