"""``aipd tune``: the tuning stage's command. Ray, torch and MLflow load inside it, so ``aipd --help`` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from app.cli_common import AddressOpt, ConfigOpt, console, err_console, handle_errors, new_app, settings_from

cli = new_app()


@cli.command("tune")
@handle_errors
def tune(
    data: Optional[str] = typer.Option(
        None, "--data", "-d", help="Dataset folder, manifest or URI (default: demo set)."
    ),
    samples: Optional[int] = typer.Option(None, "--samples", "-n", min=1, help="Number of trials."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", min=1, help="Trials running at once."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Epochs per trial (ASHA may stop it sooner)."),
    search_alg: Optional[str] = typer.Option(
        None, "--search-alg", help="optuna | hyperopt | random (optuna/hyperopt fall back to random if missing)."
    ),
    grace_period: Optional[int] = typer.Option(
        None, "--grace-period", min=1, help="Epochs before ASHA may stop a trial."
    ),
    cpus_per_trial: Optional[float] = typer.Option(
        None, "--cpus-per-trial", min=0.01, help="Logical CPUs per Train worker of a trial."
    ),
    gpus_per_trial: Optional[float] = typer.Option(
        None, "--gpus-per-trial", min=0.0, help="GPUs per Train worker of a trial; 0.25 runs four trials on one card."
    ),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Ray Train workers per trial."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="Default: GPUs when the cluster has them."),
    name: Optional[str] = typer.Option(
        None, "--name", help="Experiment name (default: a timestamp; with --resume: the latest)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted experiment with the settings it started with."
    ),
    address: Optional[str] = AddressOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Search hyperparameters with Ray Tune: every trial is a Ray Train run, ASHA stops weak ones early.

    Each trial is a nested MLflow run under one parent run; the best model is registered and `champion` moves
    only if it beats the current champion on the same validation data.

    Examples:
      aipd tune
      aipd tune --samples 16 --max-concurrent 4 --epochs 6 --search-alg optuna --name sweep1
      aipd tune --gpus-per-trial 0.25 --max-concurrent 4
      aipd tune --resume --name sweep1
    """
    from tuning.tune import TuningInterrupted, run_tuning

    if search_alg is not None and search_alg not in ("optuna", "hyperopt", "random"):
        raise typer.BadParameter("choose optuna, hyperopt or random", param_hint="--search-alg")
    settings = settings_from(
        config,
        ray_address=address,
        data={"path": data},
        train={"num_workers": workers, "use_gpu": gpu},
        tune={
            "name": name,
            "num_samples": samples,
            "max_concurrent": max_concurrent,
            "epochs": epochs,
            "search_alg": search_alg,
            "grace_period": grace_period,
            "cpus_per_trial": cpus_per_trial,
            "gpus_per_trial": gpus_per_trial,
        },
    )
    ignored = [
        flag
        for flag, value in [
            ("--data", data),
            ("--samples", samples),
            ("--max-concurrent", max_concurrent),
            ("--epochs", epochs),
            ("--search-alg", search_alg),
            ("--grace-period", grace_period),
            ("--cpus-per-trial", cpus_per_trial),
            ("--gpus-per-trial", gpus_per_trial),
            ("--workers", workers),
            ("--gpu/--no-gpu", gpu),
        ]
        if value is not None
    ]
    if resume and ignored:
        err_console.print(
            f"note: --resume continues with the settings the experiment started with; ignoring {', '.join(ignored)}"
        )
    try:
        outcome = run_tuning(settings, resume=resume)
    except TuningInterrupted as err:
        err_console.print(f"[yellow]interrupted:[/yellow] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    console.print(summary_table(outcome))
    console.print(
        f"best trial {outcome.best.trial_id}: val AUROC {outcome.val_auroc:.4f}; registered "
        f"[bold]{settings.registered_model}[/bold] version {outcome.version} "
        f"(search {outcome.search_alg}, tuning {outcome.fit_wall_s:.0f} s, total {outcome.wall_s:.0f} s)"
    )
    console.print(outcome.champion_message)
    console.print(f"experiment: {outcome.experiment_path}")
    console.print(f"MLflow: {outcome.mlflow_link}", soft_wrap=True)


SHORT_NAMES = {
    "lr": "lr",
    "weight_decay": "wd",
    "dropout": "dropout",
    "batch_size": "batch",
    "crop_size": "crop",
    "augment_prob": "aug p",
}


def summary_table(outcome: Any) -> Any:
    """One row per trial: its parameters, best validation AUROC, epochs run and whether ASHA stopped it."""
    from rich.table import Table

    from tuning.tune import format_value

    keys = [k for k in SHORT_NAMES if any(k in t.params for t in outcome.trials)]
    table = Table(title=f"tuning experiment {outcome.name}: {len(outcome.trials)} trials", caption="* best trial")
    table.add_column("trial", no_wrap=True)
    for key in keys:
        table.add_column(SHORT_NAMES[key], justify="right")
    table.add_column("AUROC", justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("early stop")
    for trial in sorted(outcome.trials, key=lambda t: t.trial_id):
        auroc = "-" if trial.best_val_auroc is None else f"{trial.best_val_auroc:.4f}"
        marker = "*" if trial.trial_id == outcome.best.trial_id else ""
        ended = "error" if trial.status == "error" else ("yes" if trial.stopped_early else "no")
        table.add_row(
            f"{trial.trial_id}{marker}",
            *(format_value(trial.params.get(k, "")) for k in keys),
            auroc,
            f"{trial.epochs_run}/{trial.epochs}",
            ended,
        )
    return table
