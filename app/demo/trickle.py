"""A steady trickle of predictions against the demo's service while its champion may move.

The demo promises that the service switches models without a failed request; this is how it checks: one request
at a time, every answer and every failure counted, and the time each model version first answered kept.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrickleStats:
    sent: int = 0
    failed: int = 0
    first_answer: dict[str, float] = field(default_factory=dict)  # model version -> wall-clock time it first answered
    failures: list[str] = field(default_factory=list)  # the first few, for the message


class Trickle:
    """Send ``image`` to ``base_url``'s /predict every ``interval_s`` on a thread, from ``start`` to ``stop``."""

    def __init__(self, base_url: str, image: Path, *, api_key: str | None, interval_s: float) -> None:
        self._base_url, self._image, self._api_key, self._interval_s = base_url, image, api_key, interval_s
        self.stats = TrickleStats()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-trickle", daemon=True)

    def start(self) -> Trickle:
        self._thread.start()
        return self

    def stop(self) -> TrickleStats:
        self._stop.set()
        self._thread.join(timeout=120)
        return self.stats

    def wait_for_version(self, version: str, timeout_s: float) -> float | None:
        """The time ``version`` first answered, waiting up to ``timeout_s`` for it; None if it never did."""
        with self._changed:
            self._changed.wait_for(lambda: version in self.stats.first_answer, timeout=timeout_s)
            return self.stats.first_answer.get(version)

    def _run(self) -> None:
        from serving.client import ServiceError, predict_files

        while not self._stop.is_set():
            try:
                result = predict_files(self._base_url, [self._image], api_key=self._api_key, timeout_s=30)[0]
                problem = None if "error" not in result else f"{result['error']}: {result.get('detail', '')}"
            except ServiceError as err:
                result, problem = {}, str(err)
            with self._changed:
                self.stats.sent += 1
                if problem is None:
                    self.stats.first_answer.setdefault(str(result.get("model_version")), time.time())
                else:
                    self.stats.failed += 1
                    if len(self.stats.failures) < 3:
                        self.stats.failures.append(problem)
                self._changed.notify_all()
            self._stop.wait(self._interval_s)
