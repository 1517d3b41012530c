"""`aipd serve` started and stopped as an operator's tools do it, with real signals: Ctrl-C to its process group,
SIGTERM to its pid (docker, Kubernetes), SIGTERM to its whole group (a supervisor), and `kill -9`. Each clean stop
answers the requests in flight, ends within 30 s and leaves nothing of the service behind; after a `kill -9` the next
start clears the leftovers and serves on the same port; a port held by someone else is named in one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from app.processes import OWNER_ENV, owner_marker, port_holder
from tests.helpers import ROOT, free_port, jpeg, make_checkpoint, wait_until

pytestmark = pytest.mark.slow

STOP_WITHIN_S = 30.0


class Served:
    """One `aipd serve` in a session of its own (so its process group can be signalled), with Ctrl-C restored:
    a background process of a script starts with SIGINT ignored, and Python would then never see KeyboardInterrupt."""

    def __init__(self, tmp_path: Path, checkpoint: Path, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIPD_", "RAY_ADDRESS"))}
        env.update({"AIPD_WORK_DIR": str(tmp_path / "work"), "PYTHONUNBUFFERED": "1"})
        self.log = open(tmp_path / f"serve-{port}-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115 - closed in stop
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aipd.cli", "serve", "--model-uri", str(checkpoint), "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        wait_until(self._ready, 180, interval_s=0.5, what=f"aipd serve on port {port}:\n{self.output()}")
        self.mark = owner_marker(self.process.pid)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"aipd serve exited with {self.process.returncode}:\n{self.output()}")
        if "press Ctrl-C to stop" not in self.output():  # the port alone may be answered by a killed run's HAProxy
            return False
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def left_behind(self) -> list[str]:
        """Processes that still carry this service's mark (its cluster, its HAProxy)."""
        left = []
        for process in psutil.process_iter(["pid", "name"]):
            try:
                if process.environ().get(OWNER_ENV) == self.mark:
                    left.append(f"{process.pid} {process.info['name']}")
            except (psutil.Error, OSError):
                continue
        return left

    def stopped_cleanly(self, started: float) -> None:
        code = self.process.wait(timeout=STOP_WITHIN_S + 30)
        took = time.monotonic() - started
        output = self.output()
        assert code in (0, 130, 143), f"exit {code}:\n{output}"
        assert took <= STOP_WITHIN_S, f"stopped in {took:.1f} s:\n{output}"
        wait_until(lambda: not self.left_behind(), 10, what=f"the service's processes to end: {self.left_behind()}")
        assert port_holder(self.port) is None, port_holder(self.port)
        assert "Traceback" not in output and "SIGTERM received" not in output, output
        self.log.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("stop") / "tiny-ckpt")


def _batch_in_flight(url: str, answers: list[int]) -> threading.Thread:
    """A batch of photos that takes a while to answer, sent just before the stop."""
    files = [("files", (f"p{i}.jpg", jpeg(640, 480, seed=i), "image/jpeg")) for i in range(24)]

    def send() -> None:
        try:
            answers.append(httpx.post(f"{url}/predict/batch", files=files, timeout=60.0).status_code)
        except httpx.HTTPError:
            answers.append(0)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    time.sleep(0.3)
    return thread


@pytest.mark.parametrize(
    "how",
    ["sigint-to-group", "sigterm-to-pid", "sigterm-to-group"],
)
def test_a_stop_answers_what_is_in_flight_and_leaves_nothing(tmp_path: Path, checkpoint: Path, how: str) -> None:
    served = Served(tmp_path, checkpoint, free_port())
    answers: list[int] = []
    in_flight = _batch_in_flight(served.url, answers)
    started = time.monotonic()
    pid = served.process.pid
    if how == "sigint-to-group":
        os.killpg(pid, signal.SIGINT)
    elif how == "sigterm-to-pid":
        os.kill(pid, signal.SIGTERM)
    else:
        os.killpg(pid, signal.SIGTERM)
    served.stopped_cleanly(started)
    in_flight.join(timeout=30)
    assert answers == [200], f"the batch in flight got {answers}"


def test_after_a_kill_9_the_next_start_clears_the_leftovers_and_serves_on_the_same_port(
    tmp_path: Path, checkpoint: Path
) -> None:
    port = free_port()
    first = Served(tmp_path, checkpoint, port)
    os.killpg(first.process.pid, signal.SIGKILL)  # the command and its group; its cluster lives on, in its own
    first.process.wait(timeout=30)
    assert first.left_behind(), "a killed aipd serve leaves its cluster running (the case this test is about)"
    second = Served(tmp_path, checkpoint, port)
    assert "left running by an earlier aipd command that was killed" in second.output()
    assert not first.left_behind()
    started = time.monotonic()
    os.kill(second.process.pid, signal.SIGTERM)
    second.stopped_cleanly(started)


def test_a_taken_port_ends_the_start_in_one_line_naming_it(tmp_path: Path, checkpoint: Path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "aipd.cli", "serve", "--model-uri", str(checkpoint), "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "AIPD_WORK_DIR": str(tmp_path / "work")},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1 and time.monotonic() - started < 60
    lines = [line for line in done.stderr.splitlines() if line.strip()]  # leftovers of other runs may be named first
    assert f"port {port} is taken by pid {os.getpid()}" in lines[-1], done.stderr
    assert lines[-1].startswith("error:") and "Traceback" not in done.stderr, done.stderr
