"""`aipd demo`: the main job end to end on one machine, and exactly what it started, stopped at the end.

Like `app/cli.py`, this is the top floor: it drives training, serving and the UI, importing each inside the step that
needs it, so the data build and `aipd --help` never load Ray or torch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from app.cli_common import console
from app.config import Settings


def run_demo(settings: Settings, *, retrain: bool, exit_after_predictions: bool, no_ui: bool) -> None:
    """Data, training (unless a champion exists), Serve, the UI, sample predictions; then wait for Ctrl-C."""
    from app.data_cli import build_demo, print_demo_summary

    started = time.perf_counter()
    print_demo_summary(build_demo(settings))
    stack = DemoStack(settings)
    try:
        stack.start_ray()
        stack.train_unless_champion(retrain)
        base_url = stack.deploy()
        ui_url = None if no_ui else stack.start_ui(base_url)
        stack.predict_samples(base_url)
        console.print(f"first predictions {time.perf_counter() - started:.0f} s after the start")
        stack.print_addresses(base_url, ui_url)
        if not exit_after_predictions:
            console.print("running; press Ctrl-C to stop everything this demo started")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        stack.stop()


class DemoStack:
    """What `aipd demo` starts, remembered so that exactly that is stopped at the end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.model_copy(update={"work_dir": settings.work_dir.resolve()})
        self.started_ray = False
        self.deployed = False
        self.ui_process: Any = None
        self.ui_log: Any = None

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
            console.print(
                f"champion exists (version {champion.version}): skipping training (use --retrain to train anew)"
            )
            return
        from training.cli import print_outcome
        from training.trainer import run_training

        settings = demo_training_settings(self.settings)
        if settings.train != self.settings.train:
            console.print(
                f"the demo trains a quick model ({settings.train.epochs} epochs, lr {settings.train.lr:g}); "
                f"`aipd train` trains the full {self.settings.train.epochs} epochs and takes over as champion "
                "if it does better"
            )
        console.print("[bold]training[/bold] (Ray Data -> Ray Train; Ray's progress below)")
        print_outcome(self.settings, run_training(settings))

    def deploy(self) -> str:
        from ray import serve

        from serving.app_builder import build_application
        from serving.config import APP_NAME, AppArgs

        serve.start(http_options={"host": self.settings.serve.host, "port": self.settings.serve.port})
        console.print("[bold]deploying[/bold] the Serve application (ingress + batched detector)")
        serve.run(build_application(self.settings, AppArgs()), name=APP_NAME, route_prefix="/")
        self.deployed = True
        return self.settings.service_url

    def start_ui(self, base_url: str) -> str:
        from ui.launch import start_ui, wait_until_up

        self.ui_log = open(self.settings.work_dir / "ui.log", "a")  # noqa: SIM115 - closed in stop()
        self.ui_process = start_ui(self.settings, base_url, self.settings.ui.port, log_file=self.ui_log)
        return wait_until_up(self.settings.ui.port, host=self.settings.ui.host, process=self.ui_process)

    def predict_samples(self, base_url: str) -> None:
        from rich.table import Table

        from app.data import index_dataset
        from serving.client import predict_files

        test = index_dataset(str(self.settings.demo_data_dir)).split("test")
        samples = sample_per_class(test, per_class=3)
        key = self.settings.api_keys[0] if self.settings.api_keys else None
        results = predict_files(base_url, [Path(p) for p in samples["path"]], api_key=key, timeout_s=120)
        table = Table(title="sample predictions through the HTTP API (unseen test scenes)")
        for column in ("file", "truth", "verdict", "probability", "confidence", "model", "ms"):
            table.add_column(column, justify="right" if column in ("probability", "ms") else "left")
        for truth, item in zip(samples["label"], results, strict=True):
            if "error" in item:
                table.add_row(item["file"], class_name(truth), f"[red]{item['error']}[/red]", "", "", "", "")
                continue
            table.add_row(
                item["file"],
                class_name(truth),
                item["prediction"],
                f"{item['probability']:.3f}",
                item["confidence"],
                str(item["model_version"]),
                f"{item['inference_time_ms']:.1f}",
            )
        thresholds = [item["threshold"] for item in results if item.get("threshold") is not None]
        if thresholds:
            table.caption = (
                f"ai_generated when the probability is at least {thresholds[0]:.2f}: the threshold set on "
                f"validation data for {self.settings.train.target_fpr:.0%} false positives, so a real photo "
                "is rarely flagged and an AI photo the model is unsure of passes as real"
            )
        console.print(table)

    def print_addresses(self, base_url: str, ui_url: str | None) -> None:
        from rich.table import Table

        from app.ray_runtime import dashboard_url
        from app.registry import mlflow_ui_hint

        dashboard = dashboard_url()
        table = Table(title="where to look", show_header=False)
        table.add_row("Serve API", f"{base_url}  (curl -F file=@photo.jpg {base_url}/predict; docs {base_url}/docs)")
        if dashboard:
            table.add_row(
                "Ray dashboard",
                f"http://{dashboard}  (token: ~/.ray/auth_token; the /api wants 'Authorization: Bearer <token>')",
            )
        table.add_row("MLflow", mlflow_ui_hint(self.settings))
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


def sample_per_class(records: Any, per_class: int) -> Any:
    """A few files of each class, the same ones on every run."""
    import pandas as pd

    parts = [records[records["label"] == label].head(per_class) for label in (0, 1)]
    return pd.concat(parts).reset_index(drop=True)


def class_name(label: Any) -> str:
    return "ai_generated" if int(label) == 1 else "real"
