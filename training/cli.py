"""`aipd train`, `aipd register` and `aipd evaluate`: the training stage's commands. Ray and torch load inside the
commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from app.cli_common import AddressOpt, ConfigOpt, console, err_console, handle_errors, new_app, settings_from

cli = new_app()


@cli.command("train")
@handle_errors
def train(
    data: Optional[str] = typer.Option(
        None, "--data", "-d", help="Dataset folder, manifest or URI (default: demo set)."
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Per worker."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=32, help="Crop side in pixels."),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Ray Train workers (one per GPU on GPU)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="Default: GPUs when the cluster has them."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Any timm model name."),
    challenger: Optional[float] = typer.Option(
        None,
        "--challenger",
        min=0.01,
        max=100.0,
        help="Register it as the challenger on a canary of this share of the photos instead of the champion rule.",
    ),
    address: Optional[str] = AddressOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Train the detector on Ray (Ray Data -> Ray Train), evaluate it, register it in MLflow.

    The alias `champion` moves to the new version only if it beats the current champion on the same validation data.

    With --challenger P the new version goes beside the champion as a canary on P% of the photos (`aipd rollout`).

    Examples:
      aipd train
      aipd train --data photos/ --epochs 10 --workers 2 --gpu
      aipd train --data feedback/ --challenger 10
      RAY_ADDRESS=ray://head:10001 aipd train --data s3://bucket/manifest.parquet
    """
    from app.registry import mlflow_ui_hint
    from training.trainer import run_training

    settings = settings_from(
        config,
        ray_address=address,
        data={"path": data},
        model={"backbone": backbone},
        train={
            "epochs": epochs,
            "batch_size": batch_size,
            "crop_size": image_size,
            "lr": lr,
            "num_workers": workers,
            "use_gpu": gpu,
            "challenger_percent": challenger,
        },
    )
    from training.progress import epoch_progress

    with epoch_progress(err_console, settings.train.epochs) as on_epoch:
        outcome = run_training(settings, on_epoch=on_epoch)
    print_outcome(settings, outcome)
    console.print(f"MLflow: {mlflow_ui_hint(settings)}", soft_wrap=True)


@cli.command("register")
@handle_errors
def register(
    checkpoint: Path = typer.Argument(..., help="A checkpoint directory, e.g. one `aipd train` kept."),
    data: Optional[str] = typer.Option(
        None, "--data", "-d", help="Dataset it was trained on: its val and test splits (default: demo set)."
    ),
    run_id: Optional[str] = typer.Option(
        None, "--run-id", help="The MLflow run of its training (default: a new run named after the checkpoint)."
    ),
    address: Optional[str] = AddressOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Register a trained checkpoint in MLflow: evaluate it on the test split, register it, apply the champion rule.

    For a model `aipd train` kept because MLflow was down as the training ended (it printed this command).

    The alias `champion` moves only if the model beats the current champion on the same validation data.

    Examples:
      aipd register .aipd/checkpoints/<run_id> --run-id <run_id>
      aipd register .aipd/checkpoints/<run_id> --data photos/ --run-id <run_id>
    """
    from app.registry import mlflow_ui_hint
    from training.registration import register_kept_checkpoint

    settings = settings_from(config, ray_address=address, data={"path": data})
    registration = register_kept_checkpoint(settings, checkpoint, run_id)
    print_report(registration.report)
    print_registration(settings, registration.version, f"run {registration.run_id}", registration.champion_message)
    console.print(f"report: {registration.report.files.get('markdown')}")
    console.print(f"MLflow: {mlflow_ui_hint(settings)}", soft_wrap=True)


@cli.command("evaluate")
@handle_errors
def evaluate(
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="models:/aipd-detector@champion (default), models:/NAME/VERSION or a checkpoint dir.",
    ),
    data: Optional[str] = typer.Option(
        None, "--data", "-d", help="Dataset (its test split is used; default: demo set)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: the work directory's reports/)."),
    no_robustness: bool = typer.Option(False, "--no-robustness", help="Skip the robustness sweep."),
    by_source: bool = typer.Option(
        False,
        "--by-source",
        help="Report the AUROC and the source head's accuracy per generator family (needs a `generator` column).",
    ),
    address: Optional[str] = AddressOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Evaluate a model on the test split: the verdicts at its threshold (false and true positives there, against the
    test split's own ROC), calibration (ECE before and after), the robustness sweep by degradation and severity, the
    share of verdicts that flip after a resize and a re-encoding, and the AUROC and the source head's accuracy per
    generator family.

    Writes Markdown, JSON and PNG plots, and logs them to the model's MLflow run.

    Examples:
      aipd evaluate
      aipd evaluate --model models:/aipd-detector/3 --data photos/ --json
      aipd evaluate --model .aipd/checkpoints/<run_id> --by-source
    """
    from training.report import evaluate_command

    settings = settings_from(config, ray_address=address, data={"path": data})
    report = evaluate_command(settings, model, out, robustness=not no_robustness, by_source=by_source)
    if as_json:
        print(json.dumps(report.to_json()))
        return
    print_report(report, by_source=by_source)
    console.print(f"report: {report.files.get('markdown')}")


def print_outcome(settings: Any, outcome: Any) -> None:
    """The test metrics of a finished training, what was registered, and what the champion rule decided."""
    print_report(outcome.report)
    details = f"run {outcome.run_id}, {outcome.epochs_run} epochs, {outcome.wall_s:.0f} s"
    print_registration(settings, outcome.version, details, outcome.champion_message)
    console.print(f"report: {outcome.report.files.get('markdown')}")


def print_registration(settings: Any, version: str, details: str, champion_message: str) -> None:
    console.print(f"registered [bold]{settings.registered_model}[/bold] version {version} ({details})")
    console.print(champion_message)


def print_report(report: Any, by_source: bool = False) -> None:
    """The test split at the shipped operating point, the robustness sweep with its flipped verdicts, and (when
    asked) the AUROC per generator family."""
    from app.operating_point import evidence_warning, format_probability

    m = report.metrics
    table = Table(title="test split")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("auroc", "ap", "accuracy", "real_accuracy", "ai_accuracy", "tpr_at_1pct_fpr", "ece"):
        table.add_row(key, f"{m[key]:.4f}")
    table.add_row("ece before calibration", f"{m['ece_uncalibrated']:.4f}")
    table.add_row("threshold", format_probability(m["threshold"]))
    target = f"{m['target_fpr']:.1%}"
    table.add_row(f"false positives at the threshold (target {target})", f"{m['fpr_at_threshold']:.4f}")
    table.add_row(
        "AI photos caught at the threshold",
        f"{m['tpr_at_threshold']:.4f} (at exactly {target} FPR on test: {m['tpr_at_target_fpr']:.4f})",
    )
    table.add_row("blurred_real_flag_rate", f"{report.blurred_real_flag_rate:.4f}")
    for name, value in report.robustness.items():
        flips, to_ai = report.flip_rate.get(name), report.flip_to_ai.get(name)
        note = (
            "" if flips is None else f" ({flips:.1%} flipped" + ("" if to_ai is None else f", {to_ai:.1%} to AI") + ")"
        )
        table.add_row(f"auroc after {name}", f"{value:.4f}{note}")
    console.print(table)
    warning = evidence_warning(report.operating_point)
    if warning:
        console.print(f"[yellow]{warning}[/yellow]")
    if by_source:
        families = Table(title="AUROC of the real photos against each generator family")
        families.add_column("family")
        families.add_column("AUROC", justify="right")
        families.add_column("source head's top-1 accuracy", justify="right")
        for name in sorted(set(report.by_source) | set(report.source_accuracy)):
            auroc, accuracy = report.by_source.get(name), report.source_accuracy.get(name)
            families.add_row(
                name, "-" if auroc is None else f"{auroc:.4f}", "-" if accuracy is None else f"{accuracy:.4f}"
            )
        console.print(families)
