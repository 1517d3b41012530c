"""What every `aipd` command shares: the consoles, the common options, error handling and the settings loader.

A leaf: stage CLIs (`training/cli.py`, `serving/cli.py`, ...) import this and nothing above it, and `aipd/cli.py`
attaches their Typer apps, so the wiring runs one way. Exit codes: 0 success, 2 bad usage (Typer), 1 a user error
printed as one line, 130 interrupted (143 on SIGTERM, 129 on SIGHUP).
"""

from __future__ import annotations

import functools
import signal
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


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP) as the interrupt it asks for: the command stops what it started, like after
    Ctrl-C, and exits with 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def catch_stop_signals() -> None:
    """SIGTERM (docker, Kubernetes, a supervisor) and SIGHUP (a closed terminal) stop the command the way Ctrl-C
    does. Installed once the command has started Ray, whose native handlers would otherwise print a stack dump and
    end the process on SIGTERM; main thread only."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stopped)


def ignore_stop_signals() -> None:
    """While a command stops what it started, a second signal (a supervisor that repeats itself, Ctrl-C held down)
    must not cut the stop short and leave half of it running."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def handle_errors(func: F) -> F:
    """A user's error becomes one line and exit code 1, Ctrl-C exit code 130 (SIGTERM 143, SIGHUP 129); a bug keeps
    its traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt as err:
            signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
            err_console.print("interrupted" if signum == signal.SIGINT else f"stopped ({signal.Signals(signum).name})")
            raise typer.Exit(128 + signum) from None
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
