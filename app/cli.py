"""The ``aipd`` command: the top floor that wires every stage.

Stage modules are imported inside the command functions, so ``aipd --help`` loads neither Ray nor torch.
Exit codes: 0 success, 2 bad usage (Typer), 1 failure with one clear line on stderr.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from app.config import ConfigError, Settings, load_settings

app = typer.Typer(
    help="AI Product Photo Detector: build data, train, tune, evaluate and serve on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Build and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML settings file (below AIPD_* env vars and flags).")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'the user must change something': one line, exit 1, no traceback."""
    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError, PermissionError]
    from app.data import DatasetError
    from app.ray_runtime import ClusterUnavailableError

    errors += [DatasetError, ClusterUnavailableError]
    for module, name in [
        ("app.images", "ImageError"),
        ("app.model", "WeightsUnavailableError"),
        ("app.registry", "RegistryError"),
    ]:
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def handle_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130)
        except Exception as err:
            if isinstance(err, _user_errors()):
                err_console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
                raise typer.Exit(1)
            pydantic_error = type(err).__name__ == "ValidationError"
            if pydantic_error:
                err_console.print(f"[red]error:[/red] invalid settings: {err}", highlight=False, soft_wrap=True)
                raise typer.Exit(1)
            raise

    return wrapper  # type: ignore[return-value]


def settings_from(config: Optional[Path], **overrides: Any) -> Settings:
    from app.logging import configure_logging

    settings = load_settings(config, **overrides)
    configure_logging(settings.log_format, settings.log_level)
    return settings


# ----------------------------------------------------------------------------------------------------------- data
@data_app.command("demo")
@handle_errors
def data_demo(
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the work directory's demo set)."),
    images_per_class: Optional[int] = typer.Option(None, "--images-per-class", "-n", min=8),
    size: Optional[int] = typer.Option(None, "--size", help="Output image side in pixels.", min=32),
    seed: Optional[int] = typer.Option(None, "--seed"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Build the embedded demo dataset offline (cached): camera-pipeline reals and generator-decoded fakes.

    Examples:
      aipd data demo
      aipd data demo --out /tmp/demo --images-per-class 200 --size 96 --seed 1
    """
    settings = settings_from(
        config, data={"demo_images_per_class": images_per_class, "demo_size": size, "demo_seed": seed}
    )
    summary = build_demo(settings, out)
    print_demo_summary(summary)


def build_demo(settings: Settings, out: Optional[Path] = None):
    """Build (or reuse) the demo set with a progress bar; shared by `data demo` and `demo`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from app.demo import build_demo_dataset

    target = out or settings.demo_data_dir
    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    ) as progress:
        task = progress.add_task("building demo images", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return build_demo_dataset(
            Path(target),
            images_per_class=settings.data.demo_images_per_class,
            size=settings.data.demo_size,
            seed=settings.data.demo_seed,
            progress=report,
        )


def print_demo_summary(summary: Any) -> None:
    info = summary.to_dict()
    table = Table(title=f"demo dataset: {info.get('out_dir')}")
    table.add_column("split")
    table.add_column("real", justify="right")
    table.add_column("ai_generated", justify="right")
    for split, counts in info["counts"].items():
        table.add_row(split, str(counts.get("real", 0)), str(counts.get("ai_generated", 0)))
    console.print(table)
    seconds = info.get("build_seconds")
    if seconds is not None:
        console.print(f"built in {seconds:.1f} s" + (" (cached)" if info.get("cached") else ""))


@data_app.command("check")
@handle_errors
def data_check(
    path: str = typer.Argument(..., help="Dataset folder, CSV/Parquet manifest, or URI (s3://...)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    config: Optional[Path] = ConfigOpt,
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start one locally)."),
) -> None:
    """Count images per split and class, and list the files that fail to decode.

    Examples:
      aipd data check .aipd/data/demo-1200x128-s0
      aipd data check manifest.csv --json
    """
    from app.data import check_dataset, index_dataset
    from app.ray_runtime import init_ray

    settings = settings_from(config, ray_address=address)
    index = index_dataset(path)
    init_ray(settings, include_dashboard=False)
    report = check_dataset(index, settings.images.max_bytes, settings.images.max_pixels)
    if as_json:
        print(json.dumps({"counts": report.counts, "bad_files": [{"path": p, "reason": r} for p, r in report.bad_files],
                          "total": report.total, "notes": report.notes}))
        return
    table = Table(title=f"dataset: {path}")
    for column in ("split", "real", "ai_generated"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for split, counts in report.counts.items():
        table.add_row(split, str(counts["real"]), str(counts["ai_generated"]))
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
    if report.bad_files:
        console.print(f"[yellow]{len(report.bad_files)} unreadable file(s) skipped:[/yellow]")
        for bad_path, reason in report.bad_files:
            console.print(f"  {bad_path}: {reason}", highlight=False)
    else:
        console.print("every file decodes")


# ----------------------------------------------------------------------------------------------------------- demo
@app.command("demo")
@handle_errors
def demo(config: Optional[Path] = ConfigOpt) -> None:
    """The main job on the embedded defaults: build the demo dataset (cached) and print its summary.

    Examples:
      aipd demo
    """
    settings = settings_from(config)
    started = time.perf_counter()
    summary = build_demo(settings)
    print_demo_summary(summary)
    console.print(f"demo finished in {time.perf_counter() - started:.1f} s")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
