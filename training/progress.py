"""A training's epochs as the driver sees them: read from the metrics rank 0 logs to the run's MLflow run.

Ray Train's own reports go to its controller's log files, not to the driver; MLflow already has every epoch, so the
driver polls the run for new ones and hands each to the listeners (`aipd train`'s progress bar, the demo's first
model). Rank 0 logs an epoch after Ray Train has stored its checkpoint, so ``EpochReport.checkpoint_dir`` is
complete when a listener hears of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.logging import get_logger
from app.scoring import SELECTION_METRIC

log = get_logger("aipd.train")

PROGRESS_METRICS = ("train_loss", SELECTION_METRIC, "val_loss", "train_images_per_s")


@dataclass(frozen=True)
class EpochReport:
    epoch: int  # 0-based, as Ray Train and MLflow's steps count
    epochs: int
    metrics: dict[str, float]
    run_id: str
    checkpoint_dir: Path  # where Ray Train stored this epoch's checkpoint (it may be pruned later)


OnEpoch = Callable[[EpochReport], None]


class EpochWatcher:
    """Polls one MLflow run every ``interval_s`` and calls ``on_epoch`` once per new epoch, in order."""

    def __init__(
        self,
        client: Any,
        run_id: str,
        epochs: int,
        checkpoint_dir: Callable[[int], Path],
        on_epoch: OnEpoch,
        interval_s: float = 1.0,
        unreachable: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._client, self._run_id, self._epochs, self._unreachable = client, run_id, epochs, unreachable
        self._checkpoint_dir, self._on_epoch, self._interval_s = checkpoint_dir, on_epoch, interval_s
        self._seen = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epoch-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after one last poll, so the final epoch is never missed (a poll stuck on a dead server is left)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self._interval_s)
            try:
                self._poll()
            except Exception as err:  # noqa: BLE001 - progress is a view: a failed read waits for the next poll
                log.debug("epoch_poll_failed", error=str(err))
            if stopping:
                return

    def _poll(self) -> None:
        problem = self._unreachable()  # in seconds, where MLflow's client would retry a dead server for minutes
        if problem is not None:
            log.debug("epoch_poll_skipped", reason=problem)
            return
        history = {m: self._client.get_metric_history(self._run_id, m) for m in PROGRESS_METRICS}
        epochs = sorted({point.step for point in history[SELECTION_METRIC]})
        for epoch in (e for e in epochs if e > self._seen):
            metrics = {name: p.value for name, points in history.items() for p in points if p.step == epoch}
            self._seen = epoch
            try:
                self._on_epoch(EpochReport(epoch, self._epochs, metrics, self._run_id, self._checkpoint_dir(epoch)))
            except Exception:  # noqa: BLE001 - a listener's bug must not stop the training it watches
                log.exception("epoch_listener_failed", epoch=epoch)


@contextmanager
def epoch_progress(console: Any, epochs: int, title: str = "training") -> Iterator[OnEpoch]:
    """A Rich progress bar over the epochs, with the last epoch's loss and val AUROC; yields its listener."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[last]}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(title, total=epochs, last="")

        def on_epoch(report: EpochReport) -> None:  # the run's own count: a run on GPUs may be sized for them
            progress.update(task, total=report.epochs, completed=report.epoch + 1, last=epoch_line(report))

        yield on_epoch


def epoch_line(report: EpochReport) -> str:
    m = report.metrics
    parts = [
        f"loss {m['train_loss']:.3f}" if "train_loss" in m else "",
        f"val AUROC {m.get(SELECTION_METRIC, 0.0):.3f}",
    ]
    if "train_images_per_s" in m:
        parts.append(f"{m['train_images_per_s']:.0f} img/s")
    return "  ".join(p for p in parts if p)
