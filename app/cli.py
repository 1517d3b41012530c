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
cluster_app = typer.Typer(help="A real multi-node Ray cluster on this machine, for trying distribution.",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")

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
        ("cluster.local_cluster", "LocalClusterError"),
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


# ------------------------------------------------------------------------------------------------------- training
@app.command("train")
@handle_errors
def train(
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset folder, manifest or URI (default: demo set)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Per worker."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=32, help="Crop side in pixels."),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Ray Train workers (one per GPU on GPU)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="Default: GPUs when the cluster has them."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Any timm model name."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS or local)."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Train the detector on Ray (Ray Data -> Ray Train), evaluate it, register it in MLflow.

    The alias `champion` moves to the new version only if it beats the current champion on the same validation data.

    Examples:
      aipd train
      aipd train --data photos/ --epochs 10 --workers 2 --gpu
      RAY_ADDRESS=ray://head:10001 aipd train --data s3://bucket/manifest.parquet
    """
    from training.trainer import run_training

    settings = settings_from(
        config, ray_address=address, data={"path": data}, model={"backbone": backbone},
        train={"epochs": epochs, "batch_size": batch_size, "crop_size": image_size, "lr": lr,
               "num_workers": workers, "use_gpu": gpu},
    )
    outcome = run_training(settings)
    print_report(outcome.report)
    console.print(f"registered [bold]{settings.registered_model}[/bold] version {outcome.version} "
                  f"(run {outcome.run_id}, {outcome.epochs_run} epochs, {outcome.wall_s:.0f} s)")
    console.print(outcome.champion_message)
    console.print(f"report: {outcome.report.files.get('markdown')}")
    print_mlflow_hint(settings)


@app.command("evaluate")
@handle_errors
def evaluate(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="models:/aipd-detector@champion (default) or a checkpoint dir."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset (its test split is used; default: demo set)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: the work directory's reports/)."),
    no_robustness: bool = typer.Option(False, "--no-robustness", help="Skip the robustness sweep."),
    address: Optional[str] = typer.Option(None, "--address"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Evaluate a model on the test split: AUROC, AP, accuracies, TPR at 1% FPR, ECE, robustness sweep.

    Writes Markdown, JSON and PNG plots, and logs them to the model's MLflow run.

    Examples:
      aipd evaluate
      aipd evaluate --model models:/aipd-detector/3 --data photos/ --json
      aipd evaluate --model .aipd/checkpoints/<run_id>
    """
    from training.report import evaluate_command

    settings = settings_from(config, ray_address=address, data={"path": data})
    report = evaluate_command(settings, model, out, robustness=not no_robustness)
    if as_json:
        print(json.dumps(report.to_json()))
        return
    print_report(report)
    console.print(f"report: {report.files.get('markdown')}")


def print_report(report: Any) -> None:
    m = report.metrics
    table = Table(title="test split")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("auroc", "ap", "accuracy", "real_accuracy", "ai_accuracy", "tpr_at_1pct_fpr", "ece", "threshold"):
        table.add_row(key, f"{m[key]:.4f}")
    table.add_row("blurred_real_flag_rate", f"{report.blurred_real_flag_rate:.4f}")
    for name, value in report.robustness.items():
        table.add_row(f"auroc after {name}", f"{value:.4f}")
    console.print(table)


def print_mlflow_hint(settings: Settings) -> None:
    uri = settings.tracking_uri
    if uri.startswith("sqlite:"):
        console.print(f"MLflow: mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")
    else:
        console.print(f"MLflow: {uri}")


# -------------------------------------------------------------------------------------------------------- cluster
@cluster_app.command("up")
@handle_errors
def cluster_up(
    workers: int = typer.Option(1, "--workers", "-w", min=0, help="Worker nodes besides the head."),
    cpus: int = typer.Option(4, "--cpus-per-node", min=1, help="Logical CPUs each node offers."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Start a head and N worker nodes on this machine, each with its own ports and the auth token.

    Examples:
      aipd cluster up --workers 2
      aipd train --address $(aipd cluster address) --workers 2
    """
    from cluster.local_cluster import cluster_up as up

    settings = settings_from(config)
    cluster = up(settings.work_dir, workers=workers, cpus_per_node=cpus)
    console.print(f"Ray cluster with {1 + workers} node(s) at [bold]{cluster.address}[/bold]")
    console.print(f"dashboard: {cluster.dashboard_url}  (token: ~/.ray/auth_token, header 'Authorization: Bearer <token>')")
    console.print(f"use it:    export RAY_AUTH_MODE=token RAY_ADDRESS={cluster.address}; aipd train --workers {1 + workers}")
    console.print("stop it:   aipd cluster down")


@cluster_app.command("address")
@handle_errors
def cluster_address(config: Optional[Path] = ConfigOpt) -> None:
    """Print the running local cluster's address (for RAY_ADDRESS / --address)."""
    from cluster.local_cluster import load_cluster

    cluster = load_cluster(settings_from(config).work_dir)
    if cluster is None:
        err_console.print("error: no local cluster is running (start one with `aipd cluster up`)")
        raise typer.Exit(1)
    print(cluster.address)


@cluster_app.command("down")
@handle_errors
def cluster_down(config: Optional[Path] = ConfigOpt) -> None:
    """Stop every process of the local cluster `aipd cluster up` started, and nothing else."""
    from cluster.local_cluster import cluster_down as down

    groups = down(settings_from(config).work_dir)
    console.print(f"stopped {len(groups)} node(s)" if groups else "no local cluster was running")


# ----------------------------------------------------------------------------------------------------------- demo
@app.command("demo")
@handle_errors
def demo(
    retrain: bool = typer.Option(False, "--retrain", help="Train even when a champion model already exists."),
    exit_after_predictions: bool = typer.Option(
        False, "--exit-after-predictions", help="Stop everything after the sample predictions (for scripts and tests)."
    ),
    no_ui: bool = typer.Option(False, "--no-ui", help="Do not start the Streamlit UI."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS or local)."),
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
    settings = settings_from(config, ray_address=address)
    started = time.perf_counter()
    summary = build_demo(settings)
    print_demo_summary(summary)
    stack = _DemoStack(settings)
    try:
        stack.start_ray()
        stack.train_unless_champion(retrain)
        base_url = stack.deploy()
        ui_url = None if no_ui else stack.start_ui(base_url)
        stack.predict_samples(base_url)
        elapsed = time.perf_counter() - started
        console.print(f"first predictions {elapsed:.0f} s after the start")
        stack.print_addresses(base_url, ui_url)
        if not exit_after_predictions:
            console.print("running; press Ctrl-C to stop everything this demo started")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        stack.stop()


class _DemoStack:
    """What `aipd demo` starts, remembered so that exactly that is stopped at the end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.model_copy(update={"work_dir": settings.work_dir.resolve()})
        self.started_ray = False
        self.deployed = False
        self.ui_process: Any = None

    def start_ray(self) -> None:
        import ray

        from app.ray_runtime import init_ray

        self.started_ray = not ray.is_initialized() and not self.settings.ray_address
        init_ray(self.settings, include_dashboard=True)

    def train_unless_champion(self, retrain: bool) -> None:
        from app.registry import get_alias_version, setup_mlflow

        setup_mlflow(self.settings)
        champion = get_alias_version(self.settings)
        if champion is not None and not retrain:
            console.print(f"champion exists (version {champion.version}): skipping training (use --retrain to train anew)")
            return
        from training.trainer import run_training

        settings = demo_training_settings(self.settings)
        if settings.train != self.settings.train:
            console.print(f"the demo trains a quick model ({settings.train.epochs} epochs, lr {settings.train.lr:g}); "
                          f"`aipd train` trains the full {self.settings.train.epochs} epochs and takes over as champion "
                          "if it does better")
        console.print("[bold]training[/bold] (Ray Data -> Ray Train; Ray's progress below)")
        outcome = run_training(settings)
        print_report(outcome.report)
        console.print(f"registered {self.settings.registered_model} version {outcome.version} "
                      f"({outcome.epochs_run} epochs, {outcome.wall_s:.0f} s)")
        console.print(outcome.champion_message)
        console.print(f"report: {outcome.report.files.get('markdown')}")

    def deploy(self) -> str:
        from ray import serve

        from serving.app_builder import build_application
        from serving.config import APP_NAME, AppArgs

        serve_settings = self.settings.serve
        serve.start(http_options={"host": serve_settings.host, "port": serve_settings.port})
        console.print("[bold]deploying[/bold] the Serve application (ingress + batched detector)")
        serve.run(build_application(self.settings, AppArgs()), name=APP_NAME, route_prefix="/")
        self.deployed = True
        host = "127.0.0.1" if serve_settings.host in ("0.0.0.0", "::") else serve_settings.host
        return f"http://{host}:{serve_settings.port}"

    def start_ui(self, base_url: str) -> str:
        from ui.launch import start_ui, wait_until_up

        self.ui_log = open(self.settings.work_dir / "ui.log", "a")  # noqa: SIM115 - closed in stop()
        self.ui_process = start_ui(self.settings, base_url, self.settings.ui.port, log_file=self.ui_log)
        return wait_until_up(self.settings.ui.port, host=self.settings.ui.host, process=self.ui_process)

    def predict_samples(self, base_url: str) -> None:
        from app.data import index_dataset
        from serving.client import predict_files

        test = index_dataset(str(self.settings.demo_data_dir)).split("test")
        samples = pd_sample(test, per_class=3)
        key = self.settings.api_keys[0] if self.settings.api_keys else None
        results = predict_files(base_url, [Path(p) for p in samples["path"]], api_key=key, timeout_s=120)
        table = Table(title="sample predictions through the HTTP API (unseen test scenes)")
        for column in ("file", "truth", "verdict", "probability", "confidence", "model", "ms"):
            table.add_column(column, justify="right" if column in ("probability", "ms") else "left")
        for truth, item in zip(samples["label"], results):
            if "error" in item:
                table.add_row(item["file"], _class_name(truth), f"[red]{item['error']}[/red]", "", "", "", "")
                continue
            table.add_row(item["file"], _class_name(truth), item["prediction"], f"{item['probability']:.3f}",
                          item["confidence"], str(item["model_version"]), f"{item['inference_time_ms']:.1f}")
        thresholds = [item["threshold"] for item in results if item.get("threshold") is not None]
        if thresholds:
            threshold = thresholds[0]
            table.caption = (f"ai_generated when the probability is at least {threshold:.2f}: the threshold set on "
                             f"validation data for {self.settings.train.target_fpr:.0%} false positives, so a real photo "
                             "is rarely flagged and an AI photo the model is unsure of passes as real")
        console.print(table)

    def print_addresses(self, base_url: str, ui_url: str | None) -> None:
        from app.ray_runtime import dashboard_url

        dashboard = dashboard_url()
        table = Table(title="where to look", show_header=False)
        table.add_row("Serve API", f"{base_url}  (curl -F file=@photo.jpg {base_url}/predict; docs {base_url}/docs)")
        if dashboard:
            table.add_row("Ray dashboard", f"http://{dashboard}  (token: ~/.ray/auth_token; the /api wants "
                          "'Authorization: Bearer <token>')")
        table.add_row("MLflow", f"mlflow ui --backend-store-uri {self.settings.tracking_uri}  (then http://127.0.0.1:5000)"
                      if self.settings.tracking_uri.startswith("sqlite:") else self.settings.tracking_uri)
        if ui_url:
            table.add_row("Streamlit UI", ui_url)
        console.print(table)

    def stop(self) -> None:
        if self.ui_process is not None:
            from ui.launch import stop_ui

            stop_ui(self.ui_process)
            self.ui_log.close()
        if self.deployed:
            from ray import serve

            serve.shutdown()
        if self.started_ray:
            import ray

            ray.shutdown()


def demo_training_settings(settings: Settings) -> Settings:
    """The settings with the demo's short schedule (demo.train_epochs, demo.train_lr) in place of train's own."""
    overrides = {"epochs": settings.demo.train_epochs, "lr": settings.demo.train_lr}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return settings.model_copy(update={"train": settings.train.model_copy(update=overrides)})


def pd_sample(records: Any, per_class: int) -> Any:
    """A few files of each class, the same ones on every run."""
    import pandas as pd

    parts = [records[records["label"] == label].head(per_class) for label in (0, 1)]
    return pd.concat(parts).reset_index(drop=True)


def _class_name(label: Any) -> str:
    return "ai_generated" if int(label) == 1 else "real"


# The stage commands live beside their stages; each module imports its heavy dependencies inside the command.
from serving.cli import register as _register_serving  # noqa: E402
from tuning.cli import register as _register_tuning  # noqa: E402
from ui.cli import register as _register_ui  # noqa: E402

_register_tuning(app)
_register_serving(app)
_register_ui(app)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
