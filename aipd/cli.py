"""The ``aipd`` command: the top floor, which attaches every stage's commands.

Each stage defines its commands in its own ``cli.py`` on the core's shared leaf ``app.cli_common`` and never imports
this package, so the wiring runs one way. Heavy libraries load inside the commands: ``aipd --help`` loads neither Ray
nor torch. Exit codes: 0 success, 2 bad usage (Typer), 1 failure with one clear line on stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from app import data_cli
from app.cli_common import AddressOpt, ConfigOpt, handle_errors, invocation, new_app, settings_from
from cluster import cli as cluster_cli
from serving import cli as serving_cli
from serving import rollout_cli
from training import cli as training_cli
from tuning import cli as tuning_cli
from ui import cli as ui_cli

app = new_app(help="AI Product Photo Detector: build data, train, tune, evaluate and serve on Ray.")


@app.callback()
def _root(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show Ray's, Serve's and the libraries' logs on the terminal too."
    ),
) -> None:
    """Every command writes its whole log to <work_dir>/logs/aipd.log and shows progress, results and problems."""
    invocation.verbose = verbose


app.add_typer(data_cli.cli, name="data")
app.add_typer(training_cli.cli)
app.add_typer(tuning_cli.cli)
app.add_typer(serving_cli.cli)
app.add_typer(ui_cli.cli)
app.add_typer(cluster_cli.cli, name="cluster")
app.add_typer(rollout_cli.cli, name="rollout")


@app.command("demo")
@handle_errors
def demo(
    retrain: bool = typer.Option(False, "--retrain", help="Train even when a champion model already exists."),
    exit_after_predictions: bool = typer.Option(
        False, "--exit-after-predictions", help="Stop everything after the sample predictions (for scripts and tests)."
    ),
    no_ui: bool = typer.Option(False, "--no-ui", help="Do not start the Streamlit UI."),
    address: Optional[str] = AddressOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """The main job end to end: demo data, training, evaluation, registry, Ray Serve, the UI, sample predictions.

    Builds the demo data (cached), trains, evaluates and registers a detector (skipped when a champion already exists,
    unless --retrain), deploys the Serve application, starts the Streamlit UI, sends a few sample images through the
    HTTP API and prints their verdicts and every address. It stays up until Ctrl-C, then stops what it started.

    Examples:
      aipd demo
      aipd demo --retrain
      aipd demo --exit-after-predictions --no-ui
    """
    from aipd.demo import run_demo

    settings = settings_from(config, ray_address=address)
    run_demo(settings, retrain=retrain, exit_after_predictions=exit_after_predictions, no_ui=no_ui)


def main() -> None:
    from app.ray_nodes import use_ray_defaults

    use_ray_defaults()
    app()


if __name__ == "__main__":
    main()
