"""`aipd data demo|check`: build the embedded demo dataset, and inspect any dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from app.cli_common import AddressOpt, ConfigOpt, console, err_console, handle_errors, new_app, settings_from
from app.config import Settings

cli = new_app(help="Build and inspect datasets.")


@cli.command("demo")
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


def build_demo(settings: Settings, out: Optional[Path] = None) -> Any:
    """Build (or reuse) the demo set with a progress bar; shared by `data demo` and `demo`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from app.demo import build_demo_dataset

    target = out or settings.demo_data_dir
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
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


def print_split_counts(title: str, counts: dict[str, dict[str, int]]) -> None:
    """Images per split and class, as every command that names a dataset shows them."""
    table = Table(title=title)
    for column in ("split", "real", "ai_generated"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for split, by_class in counts.items():
        table.add_row(split, str(by_class.get("real", 0)), str(by_class.get("ai_generated", 0)))
    console.print(table)


def print_demo_summary(summary: Any) -> None:
    info = summary.to_dict()
    print_split_counts(f"demo dataset: {info.get('out_dir')}", info["counts"])
    seconds = info.get("build_seconds")
    if seconds is not None:
        console.print(f"built in {seconds:.1f} s" + (" (cached)" if info.get("cached") else ""))


@cli.command("check")
@handle_errors
def data_check(
    path: str = typer.Argument(..., help="Dataset folder, CSV/Parquet manifest, or URI (s3://...)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    config: Optional[Path] = ConfigOpt,
    address: Optional[str] = AddressOpt,
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
    report = check_dataset(index, settings.images)
    if as_json:
        bad = [{"path": p, "reason": r} for p, r in report.bad_files]
        print(json.dumps({"counts": report.counts, "bad_files": bad, "total": report.total, "notes": report.notes}))
        return
    print_split_counts(f"dataset: {path}", report.counts)
    for note in report.notes:
        console.print(f"note: {note}")
    if report.bad_files:
        console.print(f"[yellow]{len(report.bad_files)} unreadable file(s) skipped:[/yellow]")
        for bad_path, reason in report.bad_files:
            console.print(f"  {bad_path}: {reason}", highlight=False)
    else:
        console.print("every file decodes")
