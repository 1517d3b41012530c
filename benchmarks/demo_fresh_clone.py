"""Time `make demo` from a fresh clone, as a new user meets it: first prediction, good champion, quiet output.

Usage: python benchmarks/demo_fresh_clone.py [--repo .] [--dir /tmp/demo-clone] [--log demo.log]

Clones the repository (committed state only), runs `make demo DEMO_ARGS=--exit-after-predictions` in the clone with
every output line timestamped from the moment the clone started, and prints a short table: install, data, first
prediction, the finished model's registration and the live switch, the AUROC of both models, the requests counted
during the switch, and the number of terminal lines before the first verdicts. The clone's own `.venv` is built from
scratch, so the install is in the time, as it is for a new user.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MARKS = {
    "installing": r"^installing ",
    "data built": r"^built in ",
    "first model registered": r"^first model: ",
    "first prediction": r"^first predictions \d+ s after the start",
    "finished model registered": r"^finished model: ",
    "service switched": r"the service switched from version",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="the repository to clone")
    parser.add_argument("--dir", default="/tmp/demo-clone", help="where the clone goes (removed first)")
    parser.add_argument("--log", default=None, help="timestamped output (default: <dir>.log)")
    args = parser.parse_args()
    clone = Path(args.dir)
    log_path = Path(args.log or f"{clone}.log")
    shutil.rmtree(clone, ignore_errors=True)
    started = time.monotonic()
    subprocess.run(["git", "clone", "-q", str(Path(args.repo).resolve()), str(clone)], check=True)
    lines: list[tuple[float, str]] = []
    with log_path.open("w") as log:
        process = subprocess.Popen(
            ["make", "demo", "DEMO_ARGS=--exit-after-predictions"],
            cwd=clone,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**_environment(), "PYTHONUNBUFFERED": "1", "COLUMNS": "120"},
        )
        assert process.stdout is not None
        for line in process.stdout:
            at = time.monotonic() - started
            lines.append((at, line.rstrip("\n")))
            log.write(f"{at:8.1f} {line}")
            log.flush()
        code = process.wait()
    print(summary(lines, code, log_path))
    return code


def _environment() -> dict[str, str]:
    import os

    env = dict(os.environ)
    for name in [n for n in env if n.startswith("AIPD_") or n == "RAY_ADDRESS"]:
        del env[name]
    return env


def summary(lines: list[tuple[float, str]], code: int, log_path: Path) -> str:
    def first(pattern: str) -> float | None:
        return next((at for at, text in lines if re.search(pattern, text.strip())), None)

    rows = [(name, first(pattern)) for name, pattern in MARKS.items()]
    text = "\n".join(line for _, line in lines)
    aurocs = re.findall(r"│\s*(\d+)\s*│\s*(\d+)\s*│\s*([\d.]+)\s*│\s*([\d.]+)\s*│", text)
    switch = re.search(r"(\d+) requests while training finished and the champion moved, (\d+) failed", text)
    verdicts_at = next(
        (i for i, (_, line) in enumerate(lines) if "sample predictions through the HTTP API" in line), None
    )
    out = [
        f"make demo exit code {code}; timestamped output: {log_path}",
        "",
        "| step | minutes from the clone |",
        "| --- | --- |",
    ]
    out += [f"| {name} | {_minutes(at)} |" for name, at in rows]
    out.append("")
    for version, epochs, val, test in aurocs:
        out.append(f"version {version}: {epochs} epochs, val AUROC {val}, test AUROC {test}")
    if switch:
        out.append(f"{switch.group(1)} requests during the switch, {switch.group(2)} failed")
    if verdicts_at is not None:
        out.append(f"{verdicts_at} terminal lines before the first verdicts (make's own included)")
    return "\n".join(out)


def _minutes(at: float | None) -> str:
    return "-" if at is None else f"{int(at // 60)} min {at % 60:04.1f} s"


if __name__ == "__main__":
    sys.exit(main())
