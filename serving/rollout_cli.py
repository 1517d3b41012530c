"""`aipd rollout start|status|promote|abort`: a new model beside the champion before it takes every request.

The commands change the registry (the `challenger` alias and the registered model's `rollout.*` tags, app/rollout.py)
and the running service follows it at its next look (`serve.champion_poll_s`); `status` adds what the service has
measured of each version since it started.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from app.cli_common import ConfigOpt, console, handle_errors, new_app, settings_from

cli = new_app(help="Try a registered model beside the champion: a canary share, or a shadow that only scores.")


@cli.command("start")
@handle_errors
def start(
    version: str = typer.Option(..., "--version", help="The registered version to try."),
    percent: float = typer.Option(10.0, "--percent", min=0.01, max=100.0, help="Share of the photos it takes."),
    shadow: bool = typer.Option(
        False, "--shadow", help="Score its share beside the champion without answering it (verdicts compared)."
    ),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Make VERSION the challenger: a canary answers PERCENT of the photos (chosen by their content hash, so a photo
    sent again meets the same model), or with --shadow scores them while the champion answers. It is rolled back on
    its own when its error rate, p99 latency or (shadow) disagreement passes the set margins (`serve.rollout_*`).

    Examples:
      aipd rollout start --version 7 --percent 20
      aipd rollout start --version 7 --percent 100 --shadow
    """
    from app.registry import setup_mlflow
    from app.rollout import start_rollout

    settings = settings_from(config)
    setup_mlflow(settings)
    rollout = start_rollout(settings, version, percent, shadow=shadow)
    console.print(
        f"version {rollout.version} is the challenger: {rollout.mode} on {rollout.percent:g}% of the photos; the "
        f"service follows within {settings.serve.champion_poll_s:g} s (`aipd rollout status`)"
    )


@cli.command("promote")
@handle_errors
def promote_command(config: Optional[Path] = ConfigOpt) -> None:
    """Make the challenger the champion; the running service switches to it without a failed request."""
    from app.registry import setup_mlflow
    from app.rollout import promote

    settings = settings_from(config)
    setup_mlflow(settings)
    console.print(f"version {promote(settings)} is the champion")


@cli.command("abort")
@handle_errors
def abort_command(
    reason: str = typer.Option("aborted by hand", "--reason", help="Recorded with the end of the trial."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """End the trial: the champion answers every photo again."""
    from app.registry import setup_mlflow
    from app.rollout import RolloutError, abort

    settings = settings_from(config)
    setup_mlflow(settings)
    version = abort(settings, reason)
    if version is None:
        raise RolloutError("no challenger is on trial")
    console.print(f"the trial of version {version} ended: {reason}")


@cli.command("status")
@handle_errors
def status(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    url: Optional[str] = typer.Option(None, "--url", help="Service URL (default: from the serve settings)."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """The champion and the challenger, the share and mode of the trial, how the last one ended, and per version what
    the running service measured: photos, error rate, AI share, latency and (shadow) agreement.

    Examples:
      aipd rollout status
      aipd rollout status --json
    """
    from app.client import ApiClient, ServiceError
    from app.registry import get_alias_version, setup_mlflow
    from app.rollout import current_rollout, last_ended
    from serving.retrain import retraining

    settings = settings_from(config)
    setup_mlflow(settings)
    champion = get_alias_version(settings)
    rollout, ended = current_rollout(settings), last_ended(settings)
    report: dict[str, Any] = {
        "champion": None if champion is None else champion.version,
        "rollout": None if rollout is None else rollout.__dict__,
        "last_ended": None if ended is None else ended.__dict__,
        "service": None,
    }
    try:
        report["service"] = ApiClient(url or settings.service_url).rollout()
        report["retraining"] = report["service"].get("retraining")
    except ServiceError as err:
        report["service_error"] = str(err)
        report["retraining"] = retraining(settings, ask_cluster=False)
    if as_json:
        print(json.dumps(report))
        return
    for table in _tables(report):
        console.print(table)


def _tables(report: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    rollout, ended = report["rollout"], report["last_ended"]
    table = Table(title="rollout", show_header=False)
    table.add_row("champion", str(report["champion"]))
    if rollout:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rollout["started_at"]))
        table.add_row("challenger", f"version {rollout['version']}: {rollout['mode']} on {rollout['percent']:g}%")
        table.add_row("since", f"{since} ({rollout['started_by']})")
    else:
        table.add_row("challenger", "none on trial")
    if ended:
        outcome = ended["outcome"].replace("_", " ")
        table.add_row("last trial", f"version {ended['version']} {outcome}: {ended['reason']}")
    job = report.get("retraining")
    if job:
        table.add_row("last retraining", f"Ray job {job['job']} ({job['state']}): {job['reason']}")
    service = report.get("service")
    figures = Table(title="per version, as the service measured it since it started")
    for column in ("version", "photos", "error rate", "AI share", "p50 ms", "p99 ms", "agreement"):
        figures.add_column(column, justify="left" if column == "version" else "right")
    for version, row in ((service or {}).get("versions") or {}).items():
        figures.add_row(
            version,
            str(row["requests"]),
            f"{row['error_rate']:.1%}",
            "-" if row["ai_share"] is None else f"{row['ai_share']:.1%}",
            "-" if row["p50_ms"] is None else f"{row['p50_ms']:.0f}",
            "-" if row["p99_ms"] is None else f"{row['p99_ms']:.0f}",
            "-" if row["agreement"] is None else f"{row['agreement']:.1%} of {row['compared']}",
        )
    if service is None:
        figures.caption = report.get("service_error", "the service did not answer")
    return [table, figures]
