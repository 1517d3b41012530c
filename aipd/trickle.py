"""A steady trickle of predictions against a running service while its champion may move.

The demo promises that the service switches models without a failed request, and the registry fault test that an
outage costs none; this is how both check: one request at a time on one connection, every answer recorded in order
with the version that made it, so counts, failures and the moment each version first answered are all read from it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    at: float  # wall-clock time the answer arrived
    status: int  # HTTP status; 0 when no answer came (a transport error)
    outcome: str  # the model version that answered (200), else the error and its detail


class Trickle:
    """Post ``images`` in turn to ``base_url``'s /predict every ``interval_s`` on a thread, from start to stop."""

    def __init__(self, base_url: str, images: list[bytes], *, api_key: str | None = None, interval_s: float) -> None:
        self._base_url, self._images, self._api_key, self._interval_s = base_url, images, api_key, interval_s
        self.answers: list[Answer] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trickle", daemon=True)

    def start(self) -> Trickle:
        self._thread.start()
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        self._thread.join(timeout=120)
        return self.answers

    def __enter__(self) -> Trickle:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def versions_since(self, since: float) -> list[str]:
        """The versions that answered after ``since`` (wall-clock), in order."""
        return [a.outcome for a in self.answers if a.status == 200 and a.at >= since]

    def first_answer(self, version: str) -> float | None:
        """The wall-clock time ``version`` first answered, or None."""
        return next((a.at for a in self.answers if a.status == 200 and a.outcome == version), None)

    def wait_for_version(self, version: str, timeout_s: float) -> float | None:
        """The time ``version`` first answered, waiting up to ``timeout_s`` for it; None if it never did."""
        with self._changed:
            self._changed.wait_for(lambda: self.first_answer(version) is not None, timeout=timeout_s)
            return self.first_answer(version)

    def _run(self) -> None:
        from app.client import ApiClient, ServiceError

        with ApiClient(self._base_url, self._api_key, timeout_s=30.0).session() as client:
            n = 0
            while not self._stop.is_set():
                data = self._images[n % len(self._images)]
                n += 1
                try:
                    result = client.predict("photo.jpg", data)
                    outcome = str(result.model_version) if result.ok else f"{result.error}: {result.detail}"
                    answer = Answer(time.time(), result.status or 0, outcome)
                except ServiceError as err:  # a refusal of the whole request, or no answer at all (status 0)
                    answer = Answer(time.time(), err.status or 0, f"{err.kind}: {err.detail}")
                except (ValueError, KeyError) as err:  # a 200 whose body is not the contract's
                    answer = Answer(time.time(), 0, repr(err))
                with self._changed:
                    self.answers.append(answer)
                    self._changed.notify_all()
                self._stop.wait(self._interval_s)
