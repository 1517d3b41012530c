"""A tuning experiment on disk: its folder under Ray's storage, and the state file a resume needs.

An experiment lives in ``<ray_results>/tune-<name>``; ``tune-<name>.aipd.json`` beside it keeps the MLflow parent run
id and the settings it started with, which Tune does not keep, so ``aipd tune --resume`` continues it unchanged.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.config import Settings
from app.errors import UserError

STATE_SUFFIX = ".aipd.json"
# Secrets stay out of the state file; a resume takes these sections from its own settings.
PRIVATE_SETTINGS = {"api_keys", "ui"}


class TuningError(UserError, RuntimeError):
    """A tuning run that cannot start or finish as asked; the message says what to do."""


class TuningInterrupted(TuningError):
    """The experiment stopped before every trial finished; its state is saved and ``--resume`` continues it."""


@dataclass
class ExperimentState:
    """What a resume needs and Tune does not keep: the MLflow parent run and the settings the trials were built with."""

    name: str
    parent_run_id: str
    experiment_id: str
    expected_trials: int
    search_alg: str
    settings: dict[str, Any]
    finished: bool = False
    version: str | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    def save(self, storage: Path) -> None:
        storage.mkdir(parents=True, exist_ok=True)
        state_path(storage, self.name).write_text(json.dumps(asdict(self), indent=2))


def experiment_dir(storage: Path, name: str) -> Path:
    return storage / f"tune-{name}"


def state_path(storage: Path, name: str) -> Path:
    return storage / f"tune-{name}{STATE_SUFFIX}"


def load_state(storage: Path, name: str | None) -> ExperimentState:
    """The named experiment's state, or the most recent one's when no name is given."""
    if name:
        path = state_path(storage, name)
        if not path.is_file():
            raise TuningError(f"no tuning experiment named {name!r} under {storage} (nothing to resume)")
    else:
        found = (
            sorted(storage.glob(f"tune-*{STATE_SUFFIX}"), key=lambda p: p.stat().st_mtime) if storage.is_dir() else []
        )
        if not found:
            raise TuningError(f"no tuning experiment under {storage} to resume; start one with `aipd tune`")
        path = found[-1]
    return ExperimentState(**json.loads(path.read_text()))


def fresh_settings(settings: Settings) -> Settings:
    """Settings the trials can use from any working directory (Tune runs each trial in its own folder)."""
    from app.data import resolve_data_path

    name = settings.tune.name or time.strftime("%Y%m%d-%H%M%S")
    storage = settings.ray_storage
    if experiment_dir(storage, name).exists() or state_path(storage, name).exists():
        raise TuningError(
            f"a tuning experiment named {name!r} already exists under {storage}; continue it with "
            f"`aipd tune --resume --name {name}` or choose another --name"
        )
    settings = settings.model_copy(update={"work_dir": settings.work_dir.resolve()})
    data_path = resolve_data_path(settings)
    if "://" not in data_path:
        data_path = str(Path(data_path).resolve())
    return settings.model_copy(
        update={
            "data": settings.data.model_copy(update={"path": data_path}),
            "tune": settings.tune.model_copy(update={"name": name}),
            "train": settings.train.model_copy(update={"cpus_per_worker": settings.tune.cpus_per_trial}),
        }
    )


def resumed_settings(state: ExperimentState, current: Settings) -> Settings:
    """The settings the experiment started with; only where Ray runs and how logs look come from this call."""
    saved = Settings(**state.settings)
    update = {"ray_address": current.ray_address, "log_format": current.log_format, "log_level": current.log_level}
    update.update({k: getattr(current, k) for k in PRIVATE_SETTINGS if hasattr(current, k)})
    return saved.model_copy(update=update)


def saved_settings(settings: Settings) -> dict[str, Any]:
    """The settings as the state file keeps them: plain values, no secrets."""
    return settings.model_dump(mode="json", exclude={k for k in PRIVATE_SETTINGS if hasattr(settings, k)})
