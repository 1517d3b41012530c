"""structlog for every process: the CLI, Ray workers and Serve replicas.

A terminal gets the console renderer; ``log_format="json"`` (``AIPD_LOG_FORMAT=json``) gives one JSON object a line,
which is what log shippers want. Ray worker processes do not inherit the driver's configuration, so stage code calls
``configure_logging`` again inside the worker with the format it was handed.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured: tuple[str, str] | None = None


def configure_logging(log_format: str = "console", level: str = "INFO") -> None:
    """Idempotent; safe to call at the top of every Ray task, actor and replica."""
    global _configured
    if _configured == (log_format, level.upper()):
        return
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if log_format == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    # Libraries that use the standard logging module (Ray, MLflow, uvicorn) go to stderr at the same level.
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    _configured = (log_format, level.upper())


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at write time, so a swapped stream (test runners, Typer's CliRunner)
    never leaves loggers holding a closed file."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def get_logger(name: str | None = None, **bound: Any) -> structlog.stdlib.BoundLogger:
    logger = structlog.get_logger(name) if name else structlog.get_logger()
    return logger.bind(**bound) if bound else logger
