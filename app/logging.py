"""Logging for every process: the CLI, Ray workers and Serve replicas, through structlog and the standard library.

A person at a terminal sees what they need, and a file keeps everything. In the CLI (`quiet`), the terminal gets this
project's warnings and errors and other libraries' errors only (the command prints its own progress and results),
while the log file under the work directory gets every record at the configured level. `--verbose` (or
`AIPD_LOG_LEVEL=DEBUG`) puts everything on the terminal again, and `AIPD_LOG_FORMAT=json` writes every record as one
JSON object a line, complete, for log shippers. Ray worker processes (whose output Ray writes to its own log files)
configure themselves again with the format and level they were handed.

Libraries (Ray, Ray Data, Ray Serve, MLflow) attach their own terminal handlers when first imported;
`route_library_logs` hands their records to this configuration instead, and is called once they are loaded.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import structlog

OWN_LOGGERS = ("aipd", "serving", "training", "tuning", "app", "ui", "cluster")
LIBRARY_LOGGERS = (
    *("ray", "ray.serve", "ray.data", "ray.train", "ray.tune"),
    *("mlflow", "alembic", "huey", "sqlalchemy.engine", "uvicorn"),
)

_configured: tuple[Any, ...] | None = None


def configure_logging(
    log_format: str = "console", level: str = "INFO", *, log_file: Path | None = None, quiet: bool = False
) -> None:
    """Idempotent; safe to call at the top of every Ray task, actor and replica (which pass no file, and are not
    quiet: their stderr is already a log file)."""
    global _configured
    key = (log_format, level.upper(), log_file, quiet)
    if _configured == key:
        return
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    quiet = quiet and log_format != "json" and numeric > logging.DEBUG
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    terminal = _CurrentStderrHandler()
    terminal.setFormatter(_formatter(log_format, shared, colors=sys.stderr.isatty()))
    if quiet:
        terminal.addFilter(_worth_showing)
    handlers: list[logging.Handler] = [terminal]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(_formatter(log_format, shared, colors=False))
        handlers.append(file_handler)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)  # warnings are records too: in the file, and on the terminal when verbose
    if quiet:  # MLflow prints these itself: download bars once per model load, and a run's URL when it ends
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    _configured = key
    route_library_logs()


def route_library_logs() -> None:
    """Hand the libraries' records to the root handlers above (terminal filter and file) instead of their own.

    Only where a log file is configured (a command's own process): in a Serve replica, stderr is itself a logger of
    Ray's, which must keep its own handlers or every record would come back through it.
    """
    if _configured is None or _configured[2] is None:
        return
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
    if "mlflow" in sys.modules:
        # MLflow also prints straight to its own stream ("Created version '2' of model ..."): make those records.
        from mlflow.utils import logging_utils

        logging_utils.MLFLOW_LOGGING_STREAM.write = _LinesToLog("mlflow").write
        logging_utils.MLFLOW_LOGGING_STREAM.flush = lambda: None


class _LinesToLog:
    """A write-only stream whose lines become INFO records of one logger."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in filter(None, (line.strip() for line in lines)):
            self._logger.info(line)
        return len(text)


def _worth_showing(record: logging.LogRecord) -> bool:
    """On a quiet terminal: this project's warnings and errors, everyone's errors."""
    own = record.name.split(".")[0] in OWN_LOGGERS
    return record.levelno >= (logging.WARNING if own else logging.ERROR)


def _formatter(log_format: str, shared: list[Any], *, colors: bool) -> logging.Formatter:
    renderer: Any = (
        structlog.processors.JSONRenderer() if log_format == "json" else structlog.dev.ConsoleRenderer(colors=colors)
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([structlog.processors.format_exc_info] if log_format == "json" else []),
            renderer,
        ],
    )


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at write time, so a swapped stream (test runners, Typer's CliRunner)
    never leaves a handler holding a closed file."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def get_logger(name: str | None = None, **bound: Any) -> structlog.stdlib.BoundLogger:
    logger = structlog.get_logger(name) if name else structlog.get_logger()
    return logger.bind(**bound) if bound else logger
