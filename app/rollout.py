"""A new model beside the champion, before it takes every request: the rollout's state in the registry, and which
model answers which photo.

The registry holds it all, so the CLI, every serving replica and a retraining job agree without talking to each
other: the alias `challenger` names the version on trial, and the registered model's `rollout.*` tags say how (a
canary share of the traffic, or a shadow that scores and is compared without answering), since when, and, once it
ended, why. A photo's content hash picks its arm, so the same photo sent again meets the same model, and a canary of
P% takes P% of the distinct photos, whatever their order.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Literal

from app.config import Settings
from app.errors import UserError

Mode = Literal["canary", "shadow"]
Arm = Literal["champion", "challenger", "shadow"]
TAG = "rollout."
_STATE_TAGS = ("mode", "percent", "version", "started_at", "started_by")


class RolloutError(UserError, RuntimeError):
    """A rollout command that cannot be carried out as asked; the message says why."""


@dataclass(frozen=True)
class Rollout:
    """The challenger on trial: its version, how it is tried, on what share of the photos, and since when."""

    version: str
    mode: Mode
    percent: float
    started_at: float
    started_by: str = "aipd rollout start"


@dataclass(frozen=True)
class Ended:
    """How the last rollout ended: promoted, aborted by a person, or rolled back automatically, and why."""

    version: str
    outcome: Literal["promoted", "aborted", "rolled_back"]
    reason: str
    at: float


def arm_of(digest: bytes | str, rollout: Rollout | None) -> Arm:
    """The arm a photo's content hash (its SHA-256) falls in: a canary's share of the hash space goes to the
    challenger; in shadow mode that share is scored by both, the champion answering."""
    if rollout is None:
        return "champion"
    head = bytes.fromhex(digest[:16]) if isinstance(digest, str) else digest[:8]
    position = int.from_bytes(head[:8], "big") / 2**64 * 100.0
    if position >= rollout.percent:
        return "champion"
    return "challenger" if rollout.mode == "canary" else "shadow"


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def current_rollout(settings: Settings) -> Rollout | None:
    """The rollout the registry records, or None when no challenger is on trial."""
    from mlflow import MlflowClient

    from app.registry import get_alias_version

    challenger = get_alias_version(settings, settings.challenger_alias)
    if challenger is None:
        return None
    tags = _model_tags(MlflowClient(), settings.registered_model)
    if tags.get(TAG + "version") != challenger.version:
        return Rollout(challenger.version, "canary", 0.0, 0.0, "the challenger alias, set without a rollout")
    return Rollout(
        version=challenger.version,
        mode="shadow" if tags.get(TAG + "mode") == "shadow" else "canary",
        percent=float(tags.get(TAG + "percent", 0.0)),
        started_at=float(tags.get(TAG + "started_at", 0.0)),
        started_by=tags.get(TAG + "started_by", ""),
    )


def last_ended(settings: Settings) -> Ended | None:
    from mlflow import MlflowClient

    tags = _model_tags(MlflowClient(), settings.registered_model)
    if TAG + "ended_outcome" not in tags:
        return None
    return Ended(
        version=tags.get(TAG + "ended_version", "?"),
        outcome=tags[TAG + "ended_outcome"],  # type: ignore[arg-type]
        reason=tags.get(TAG + "ended_reason", ""),
        at=float(tags.get(TAG + "ended_at", 0.0)),
    )


def start_rollout(
    settings: Settings, version: str, percent: float, *, shadow: bool = False, started_by: str = "aipd rollout start"
) -> Rollout:
    """Make ``version`` the challenger with its share of the photos (a shadow scores its share without answering)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from app.registry import get_alias_version, set_alias

    if not 0 < percent <= 100:
        raise RolloutError(f"the share must be above 0 and at most 100 percent, not {percent}")
    client = MlflowClient()
    try:
        client.get_model_version(settings.registered_model, version)
    except MlflowException as err:
        raise RolloutError(f"{settings.registered_model} has no version {version}") from err
    champion = get_alias_version(settings)
    if champion is not None and champion.version == version:
        raise RolloutError(f"version {version} is the champion already; roll out another version")
    rollout = Rollout(version, "shadow" if shadow else "canary", float(percent), time.time(), started_by)
    for name in _STATE_TAGS:
        client.set_registered_model_tag(settings.registered_model, TAG + name, str(getattr(rollout, name)))
    set_alias(settings, version, settings.challenger_alias)
    return rollout


def promote(settings: Settings) -> str:
    """The challenger becomes the champion; the running service switches to it at its next look."""
    from app.registry import set_alias

    rollout = _require(settings)
    set_alias(settings, rollout.version)
    _end(settings, rollout, "promoted", "promoted to champion")
    return rollout.version


def abort(settings: Settings, reason: str, *, outcome: Literal["aborted", "rolled_back"] = "aborted") -> str | None:
    """End the trial: the challenger alias goes, the reason stays in the registry. None when none was on trial."""
    rollout = current_rollout(settings)
    if rollout is None:
        return None
    _end(settings, rollout, outcome, reason)
    return rollout.version


def _require(settings: Settings) -> Rollout:
    rollout = current_rollout(settings)
    if rollout is None:
        raise RolloutError("no challenger is on trial (`aipd rollout start --version V --percent P` starts one)")
    return rollout


def _end(settings: Settings, rollout: Rollout, outcome: str, reason: str) -> None:
    from mlflow import MlflowClient

    from app.registry import missing_ok

    client = MlflowClient()
    name = settings.registered_model
    ended = {"ended_version": rollout.version, "ended_outcome": outcome, "ended_reason": reason}
    for key, value in {**ended, "ended_at": str(time.time())}.items():
        client.set_registered_model_tag(name, TAG + key, value)
    with missing_ok():  # another replica ended it first
        client.delete_registered_model_alias(name, settings.challenger_alias)
    for key in _STATE_TAGS:
        with missing_ok():
            client.delete_registered_model_tag(name, TAG + key)


def _model_tags(client: object, name: str) -> dict[str, str]:
    from app.registry import missing_ok

    with missing_ok():
        return dict(client.get_registered_model(name).tags or {})  # type: ignore[attr-defined]
    return {}
