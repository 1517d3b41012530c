"""`aipd demo`: the main job end to end on one machine, serving early and getting better while it serves.

The demo starts the full training schedule on Ray, registers and serves the checkpoint of an early epoch
(`demo.first_model_epoch`) as soon as it exists, answers the sample photos with it, and keeps training on the same
cluster while the service answers. When the finished model beats the first on validation data the champion alias
moves, the running service switches to it (a steady trickle of requests counts any that fail) and the demo prints the
new verdicts. Everything it started (Ray, the MLflow server, Serve, the UI) stops with Ctrl-C.

The top floor, like `aipd/cli.py`: it drives training, serving and the UI, importing each inside the step that needs
it, so the data build and `aipd --help` never load Ray or torch.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.cli_common import catch_stop_signals, console, ignore_stop_signals, warn
from app.config import Settings

# The demo's service looks for a new champion this often unless serve.champion_poll_s is set: the finished model
# should be seen switching in soon after it is registered.
DEMO_CHAMPION_POLL_S = 3.0


def run_demo(settings: Settings, *, retrain: bool, exit_after_predictions: bool, no_ui: bool) -> None:
    """Data, Ray and MLflow, a first model served as soon as it exists, the full one switched in live; then wait
    for Ctrl-C (or return, with ``exit_after_predictions``)."""
    from app.data_cli import build_demo, print_demo_summary, print_split_counts

    started = time.perf_counter()
    if settings.data.path:
        from app.data import index_dataset

        print_split_counts(f"dataset: {settings.data.path}", index_dataset(settings.data.path).counts())
    else:
        print_demo_summary(build_demo(settings))
    stack = DemoStack(settings)
    try:
        stack.start_services()
        champion = stack.current_champion()
        if champion is not None and not retrain:
            console.print(
                f"serving the existing champion, version {champion}, without training (`aipd demo --retrain` trains)"
            )
            base_url = stack.deploy()
            stack.wait_until_serving(base_url, champion)
            stack.predict_samples(base_url, f"version {champion}")
            console.print(f"first predictions {time.perf_counter() - started:.0f} s after the start")
            stack.print_addresses(base_url, None if no_ui else stack.start_ui(base_url))
        else:
            stack.serve_while_training(started, no_ui=no_ui)
        if not exit_after_predictions:
            console.print("running; press Ctrl-C to stop everything this demo started")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM / SIGHUP (Stopped): the exit code says which
        console.print("stopping: draining the service, then the UI, Ray and the MLflow server")
        raise
    finally:
        stack.stop()


class DemoStack:
    """What `aipd demo` starts, remembered so that exactly that is stopped at the end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.model_copy(update={"work_dir": settings.work_dir.resolve()})
        self.cluster: Any = None  # the local cluster this demo owns (app/ray_nodes.py), if it started one
        self.deployed = False
        self.mlflow_server: Any = None
        self.ui_process: Any = None
        self.logs: list[Any] = []
        self.training: BackgroundTraining | None = None
        self._index: Any = None
        self.first: FirstModel | None = None

    # ------------------------------------------------------------------------------------------- start and stop
    def start_services(self) -> None:
        """Ray (with its dashboard) and, over the work directory's store, an MLflow server every process uses."""
        import ray

        from app.mlflow_server import start_mlflow_server
        from app.ray_runtime import free_port, init_ray, sized_for_cluster, start_local_cluster
        from serving.lifecycle import clear_leftovers, require_free_port

        logs_dir = self.settings.log_file.parent
        console.print(
            f"logs: {self.settings.log_file} (this demo), {logs_dir}/mlflow.log, {logs_dir}/ui.log and Ray's under "
            "/tmp/ray/session_latest/logs; `aipd --verbose demo` shows them here too",
            soft_wrap=True,
        )
        if not self.settings.ray_address:
            for line in clear_leftovers():
                warn(line)
            require_free_port(self.settings.serve.host, self.settings.serve.port)
        if self.settings.mlflow_tracking_uri is None and not self.settings.ray_address:
            log_path = logs_dir / "mlflow.log"
            log = self._log_file(log_path)
            self.mlflow_server = start_mlflow_server(self.settings, free_port(), log=log, log_path=log_path)
        if self.settings.ray_address or ray.is_initialized():
            init_ray(self.settings, include_dashboard=True)
        else:  # while the MLflow server starts
            self.cluster = start_local_cluster(self.settings, include_dashboard=True)
        catch_stop_signals()  # once Ray is up: its native SIGTERM handler would end the process with a stack dump
        self.settings = sized_for_cluster(self.settings)
        if self.mlflow_server is not None:
            self.mlflow_server.wait_until_up()
            self.settings = self.settings.model_copy(update={"mlflow_tracking_uri": self.mlflow_server.url})
        from app.registry import setup_mlflow

        setup_mlflow(self.settings)

    def _log_file(self, path: Path) -> Any:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")  # noqa: SIM115 - closed in stop()
        self.logs.append(handle)
        return handle

    def stop(self) -> None:
        """Everything the demo started, in the order that loses nothing: the page, the service (drained first),
        Ray, the training it ran, then the MLflow server the others wrote to."""
        ignore_stop_signals()
        if self.ui_process is not None:
            from ui.launch import stop_ui

            stop_ui(self.ui_process)
        if self.deployed:
            from serving.config import APP_NAME
            from serving.lifecycle import drain_and_stop

            drain_and_stop(APP_NAME)
        if self.cluster is not None:
            import ray

            ray.shutdown()
            self.cluster.stop()
        if self.training is not None:
            self.training.join(timeout_s=5)  # a training cut short marks its run FAILED while MLflow still answers
        if self.mlflow_server is not None:
            self.mlflow_server.stop()
        for handle in self.logs:
            handle.close()

    # ------------------------------------------------------------------------------------------------- serving
    def current_champion(self) -> str | None:
        from app.registry import get_alias_version

        champion = get_alias_version(self.settings)
        return None if champion is None else champion.version

    def deploy(self) -> str:
        """Deploy the Serve application on the champion alias; until the alias exists it answers 503 and looks
        for it every `DEMO_CHAMPION_POLL_S` (or `serve.champion_poll_s`, when set)."""
        from ray import serve

        from serving.app_builder import build_application
        from serving.config import APP_NAME, AppArgs
        from serving.deploy import run_app

        serve.start(http_options={"host": self.settings.serve.host, "port": self.settings.serve.port})
        settings = self.settings
        if "champion_poll_s" not in settings.serve.model_fields_set:
            settings = settings.model_copy(
                update={"serve": settings.serve.model_copy(update={"champion_poll_s": DEMO_CHAMPION_POLL_S})}
            )
        run_app(build_application(settings, AppArgs()), APP_NAME)
        self.deployed = True
        return self.settings.service_url

    def wait_until_serving(self, base_url: str, version: str, timeout_s: float = 600.0) -> None:
        """Until /health says ``version`` is loaded (a replica loads a new champion within a poll or two)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                body = httpx.get(f"{base_url}/health", timeout=5.0).json()
                if body.get("model_loaded") and str(body.get("model_version")) == version:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"the service at {base_url} did not serve version {version} within {timeout_s:.0f} s")

    def start_ui(self, base_url: str) -> str:
        from app.ray_runtime import dashboard_url
        from app.registry import mlflow_ui_url
        from ui.launch import start_ui, wait_until_up

        dashboard = dashboard_url()
        links = {
            "ray_dashboard_url": f"http://{dashboard}" if dashboard else None,
            "mlflow_url": mlflow_ui_url(self.settings),
        }
        ui = self.settings.ui.model_copy(update={k: getattr(self.settings.ui, k) or v for k, v in links.items()})
        settings = self.settings.model_copy(update={"ui": ui})
        log = self._log_file(self.settings.log_file.parent / "ui.log")
        self.ui_process = start_ui(settings, base_url, settings.ui.port, log_file=log)
        return wait_until_up(settings.ui.port, host=settings.ui.host, process=self.ui_process)

    # ------------------------------------------------------------------------------------------------ training
    def serve_while_training(self, started: float, *, no_ui: bool) -> None:
        """The full schedule in the background; its early checkpoint served first, the finished model switched in."""
        epochs, first_epoch = self.settings.train.epochs, self.settings.demo.first_model_epoch
        console.print(
            f"[bold]training[/bold] {epochs} epochs on Ray (Ray Data -> Ray Train); the model of epoch "
            f"{first_epoch} is served first, and the finished one takes over if it does better"
        )
        # the workers see the demo's file only on this machine: a cluster it joined trains without the hold
        self.training = BackgroundTraining(
            self.settings, first_epoch if first_epoch < epochs else None, hold=self.cluster is not None
        ).start()
        base_url = self.deploy()  # its replicas start while the first epochs train
        # training holds after the early epoch until its model answers: fitting and serving it on cores the next
        # epochs would take made the first answer minutes later (benchmarks/RESULTS.md, "The first ten minutes")
        try:
            first = self.training.first_checkpoint()
            first_version = self.register_first(first) if first is not None else None
            outcome = None
            if first_version is None:
                self.training.release()
                outcome = self.training.wait()
                print_registration(outcome)
            serving = self.current_champion()
            if serving is None:
                raise RuntimeError("no model became champion; see the messages above")
            self.wait_until_serving(base_url, serving)
            self.predict_samples(base_url, f"version {serving}")
        finally:
            self.training.release()
        console.print(f"first predictions {time.perf_counter() - started:.0f} s after the start")
        self.print_addresses(base_url, None if no_ui else self.start_ui(base_url))
        if outcome is None:
            outcome = self.switch_live(base_url, serving)
        self.compare(outcome)

    def register_first(self, report: Any) -> str | None:
        """Register the early epoch's checkpoint, in a run of its own nested under the training's run (so the
        registry shows its own numbers, not the finished model's), and apply the champion rule to it."""
        from mlflow import MlflowClient

        from app.model import copy_checkpoint
        from training.registration import register_checkpoint

        epoch = report.epoch + 1
        client = MlflowClient()
        parent = client.get_run(report.run_id)
        run_id = client.create_run(
            parent.info.experiment_id,
            run_name=f"{parent.info.run_name}-epoch{epoch}",
            tags={"mlflow.parentRunId": report.run_id, "epoch": str(epoch), "demo_stage": "first"},
        ).info.run_id
        for name, value in report.metrics.items():
            client.log_metric(run_id, name, value, step=report.epoch)
        kept = copy_checkpoint(report.checkpoint_dir, self.settings.checkpoint_dir(run_id))
        # the early model answers while training goes on: fitting its source head would take the CPUs training has
        # (minutes on two cores) from the first answer; the finished model gets it
        version, val_auroc, _, message = register_checkpoint(
            self.settings, kept, run_id, self.index(), tags={"epoch": epoch, "demo_stage": "first"}, source_head=False
        )
        self.first = FirstModel(version.version, run_id, kept, epoch, val_auroc)
        console.print(
            f"first model: epoch {epoch} of {report.epochs}, val AUROC {val_auroc:.3f}, registered as version "
            f"{version.version}; {message}",
            soft_wrap=True,
        )
        return version.version

    def switch_live(self, base_url: str, serving: str) -> Any:
        """Wait for the finished training with a trickle of requests going; report the switch and its failures."""
        from aipd.trickle import Trickle

        assert self.training is not None
        key = self.settings.api_keys[0] if self.settings.api_keys else None
        photo = self.sample_paths()[0].read_bytes()
        trickle = Trickle(base_url, [photo], api_key=key, interval_s=self.settings.demo.trickle_interval_s).start()
        try:
            outcome = self.training.wait()
            print_registration(outcome)
            if outcome.champion_moved and outcome.version != serving:
                switched = trickle.wait_for_version(outcome.version, timeout_s=300)
                if switched is None:
                    console.print(f"[yellow]the service did not switch to version {outcome.version} in 5 minutes[/]")
        finally:
            trickle.stop()
        switched_at = trickle.first_answer(outcome.version) if outcome.champion_moved else None
        if switched_at is not None:
            at = time.strftime("%H:%M:%S", time.localtime(switched_at))
            console.print(f"[bold]the service switched from version {serving} to {outcome.version} at {at}[/bold]")
            self.predict_samples(base_url, f"version {outcome.version}")
        failures = trickle.failures()
        console.print(
            f"[{'red' if failures else 'green'}]{len(trickle.answers)} requests while training finished and the "
            f"champion moved, {len(failures)} failed[/]"
            + (f" ({'; '.join(a.outcome for a in failures[:3])})" if failures else "")
        )
        return outcome

    def compare(self, outcome: Any) -> None:
        """The first and the finished model side by side, on the same validation and test splits; the first
        model's test AUROC goes to its run, where the registry and the UI read a version's numbers."""
        from mlflow import MlflowClient
        from rich.table import Table

        from app.model import load_checkpoint
        from app.scoring import auroc, score_split

        first = self.first
        if first is None:
            return
        loaded = load_checkpoint(first.checkpoint_dir)
        first_test = auroc(*score_split(loaded, self.index().split("test"), self.settings.images))
        client = MlflowClient()
        client.log_metric(first.run_id, "test_auroc", first_test)
        client.set_terminated(first.run_id, status="FINISHED")
        champion = self.current_champion()
        table = Table(title="the first and the finished model")
        for column in ("version", "epochs", "val AUROC", "test AUROC", "champion"):
            table.add_column(column, justify="right" if column != "champion" else "left")
        rows = [
            (first.version, first.epoch, first.val_auroc, first_test),
            (outcome.version, outcome.epochs_run, outcome.val_auroc, outcome.report.metrics["auroc"]),
        ]
        for version, epochs, val, test in rows:
            table.add_row(version, str(epochs), f"{val:.3f}", f"{test:.3f}", "yes" if champion == version else "")
        console.print(table)

    # ------------------------------------------------------------------------------------------------- output
    def index(self) -> Any:
        """The data the demo trains on (the demo set unless data.path says otherwise), indexed once."""
        if self._index is None:
            from app.data import index_dataset, resolve_data_path

            self._index = index_dataset(resolve_data_path(self.settings))
        return self._index

    def sample_paths(self) -> list[Path]:
        return [Path(p) for p in sample_per_class(self.index().split("test"), per_class=3)["path"]]

    def predict_samples(self, base_url: str, model: str) -> None:
        from rich.table import Table

        from app.client import predict_files
        from app.operating_point import format_probability

        samples = sample_per_class(self.index().split("test"), per_class=3)
        key = self.settings.api_keys[0] if self.settings.api_keys else None
        results = predict_files(base_url, [Path(p) for p in samples["path"]], api_key=key, timeout_s=120)
        table = Table(title=f"sample predictions through the HTTP API by {model} (unseen test scenes)")
        for column in ("file", "truth", "verdict", "probability", "confidence", "ms"):
            table.add_column(column, justify="right" if column in ("probability", "ms") else "left")
        for truth, item in zip(samples["label"], results, strict=True):
            if "error" in item:
                table.add_row(short_name(item["file"]), class_name(truth), f"[red]{item['error']}[/red]", "", "", "")
                continue
            right = item["prediction"] == class_name(truth)
            table.add_row(
                short_name(item["file"]),
                class_name(truth),
                item["prediction"] if right else f"[red]{item['prediction']}[/red]",
                f"{item['probability']:.3f}",
                item["confidence"],
                f"{item['inference_time_ms']:.1f}",
            )
        thresholds = [item["threshold"] for item in results if item.get("threshold") is not None]
        if thresholds:
            table.caption = (
                f"ai_generated at a calibrated probability of {format_probability(thresholds[0])} or more: the "
                f"operating point set on the validation photos for {self.settings.train.target_fpr:.0%} false positives"
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


@dataclass
class FirstModel:
    """The early checkpoint the demo served first, and where its numbers live."""

    version: str
    run_id: str
    checkpoint_dir: Path
    epoch: int
    val_auroc: float


class BackgroundTraining:
    """`run_training` on a thread with a progress bar; hands over the early epoch's report when it exists."""

    def __init__(self, settings: Settings, first_epoch: int | None, *, hold: bool = False) -> None:
        self.settings, self.first_epoch, self.hold = settings, first_epoch, hold
        # written by `release`; the workers wait for it after the early epoch (a fresh name, so that no file an
        # earlier demo left behind lets them go at once)
        self._released = settings.work_dir.resolve() / f".demo-release-{os.getpid()}-{time.time_ns()}"
        self._first: Any = None
        self._first_ready = threading.Event()
        self._done = threading.Event()
        self._outcome: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="demo-training", daemon=True)

    def start(self) -> BackgroundTraining:
        self._thread.start()
        return self

    def first_checkpoint(self) -> Any:
        """The early epoch's report, or None when training ended first (or has no early model to give)."""
        _wait(self._first_ready)
        if self._error is not None and self._first is None:
            raise self._error
        return self._first

    def release(self) -> None:
        """Let training go on after the early epoch (idempotent)."""
        self._released.parent.mkdir(parents=True, exist_ok=True)
        self._released.touch()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout=timeout_s)

    def wait(self) -> Any:
        _wait(self._done)
        if self._error is not None:
            raise self._error
        return self._outcome

    def _run(self) -> None:
        from training.progress import epoch_progress
        from training.trainer import run_training

        try:
            with epoch_progress(console, self.settings.train.epochs) as show:

                def on_epoch(report: Any) -> None:
                    show(report)
                    if self.first_epoch is not None and report.epoch + 1 == self.first_epoch:
                        self._first = report
                        self._first_ready.set()

                hold = (self.first_epoch, self._released) if self.hold and self.first_epoch is not None else None
                self._outcome = run_training(self.settings, on_epoch=on_epoch, hold=hold)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which reports it
            self._error = err
        finally:
            self._first_ready.set()
            self._done.set()
            self._released.unlink(missing_ok=True)


def print_registration(outcome: Any) -> None:
    """The finished training in a few lines; its full test report is in the file named, MLflow and the UI."""
    console.print(
        f"finished model: {outcome.epochs_run} epochs in {outcome.wall_s:.0f} s, val AUROC {outcome.val_auroc:.3f}, "
        f"test AUROC {outcome.report.metrics['auroc']:.3f}, registered as version {outcome.version}; "
        f"{outcome.champion_message}",
        soft_wrap=True,
    )
    m = outcome.report.metrics
    console.print(
        f"at its threshold on the test split: {m['fpr_at_threshold']:.1%} of the real photos flagged, "
        f"{m['tpr_at_threshold']:.1%} of the AI photos caught; its test report: {outcome.report.files.get('markdown')}",
        soft_wrap=True,
    )


def _wait(event: threading.Event) -> None:
    """Event.wait in short steps, so Ctrl-C reaches the main thread at once."""
    while not event.wait(0.5):
        pass


def sample_per_class(records: Any, per_class: int) -> Any:
    """A few files of each class, the same ones on every run."""
    import pandas as pd

    parts = [records[records["label"] == label].head(per_class) for label in (0, 1)]
    return pd.concat(parts).reset_index(drop=True)


def short_name(path: str) -> str:
    """The file and its folder: enough to tell the samples apart when both classes number their files alike."""
    return "/".join(Path(path).parts[-2:])


def class_name(label: Any) -> str:
    return "ai_generated" if int(label) == 1 else "real"
