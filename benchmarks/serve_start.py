"""Time `aipd serve --model-uri <checkpoint>` from the command to its first answer, and its stop on Ctrl-C.

Usage: python benchmarks/serve_start.py [--rounds 3] [--baseline REV]

Each round starts the command of this tree (and, with --baseline, of the commit REV checked out beside it, in
alternation, so both meet the same machine load), waits for "press Ctrl-C to stop" and a 200 from /health, then sends
SIGINT to the command's process group as a terminal does and waits for it to exit. The command's output lines are
timestamped from its start, so the table shows where the start goes: until the local cluster's config is written,
until the service is ready, and the whole. A small untrained checkpoint is made for it; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.ray_nodes import free_port  # noqa: E402 - after the path that finds the project

MARKS = {"cluster up": "Serve config written to", "ready": "press Ctrl-C to stop"}


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2.0) as response:
            return response.status == 200
    except OSError:
        return False


def one_start(tree: Path, checkpoint: Path, work: Path, log: Path) -> dict[str, float]:
    """One start and stop of the command in ``tree``; seconds from the command's start to each mark."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIPD_", "RAY_ADDRESS"))}
    env.update({"AIPD_WORK_DIR": str(work), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tree)})
    command = [sys.executable, "-m", "aipd.cli", "serve", "--model-uri", str(checkpoint), "--port", str(port)]
    seen: dict[str, float] = {}
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job starts with it ignored
    )

    def read() -> None:
        with log.open("a") as out:
            for line in process.stdout:
                at = time.monotonic() - started
                out.write(f"{at:7.2f} {line}")
                for mark, text in MARKS.items():
                    if text in line and mark not in seen:
                        seen[mark] = at

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = started + 300
        while not ("ready" in seen and healthy(port)):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"aipd serve in {tree} did not start; see {log}")
            time.sleep(0.05)
        seen["first answer"] = time.monotonic() - started
    finally:
        stop = time.monotonic()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=120)
        seen["stop"] = time.monotonic() - stop
        reader.join(timeout=10)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="a commit to time beside this tree, e.g. HEAD~1")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "aipd-serve-start.log")
    args = parser.parse_args()

    from app.model import ModelConfig, PreprocessSettings, build_model, save_checkpoint

    scratch = Path(tempfile.mkdtemp(prefix="aipd-serve-start-"))
    checkpoint = scratch / "checkpoint"
    config = ModelConfig()
    save_checkpoint(checkpoint, build_model(config), config, PreprocessSettings(crop_size=64))
    trees = {"this tree": ROOT}
    base = scratch / "baseline"
    if args.baseline:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base), args.baseline], check=True
        )
        trees = {f"baseline {args.baseline}": base, **trees}
    args.log.write_text("")
    times: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    try:
        for round_ in range(args.rounds):
            for name, tree in trees.items():
                with args.log.open("a") as out:
                    out.write(f"--- round {round_ + 1}, {name}\n")
                seen = one_start(tree, checkpoint, scratch / "work", args.log)
                times[name].append(seen)
                print(f"round {round_ + 1} {name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seen.items()), flush=True)
    finally:
        if args.baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)])
    columns = [*MARKS, "first answer", "stop"]
    print(f"\nmedians of {args.rounds} rounds, seconds from the command (log: {args.log})")
    print("| tree | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, runs in times.items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(r[c] for r in runs):.1f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
