"""Verdicts a marketplace can act on, measured the way a user meets them: `aipd train` with every default.

Why these numbers: people act on the verdict at the shipped threshold, not on the AUROC, so each run reports the
false- and true-positive rates realised at that threshold on the test split beside the test split's own TPR at the
target FPR (does the operating point transfer?), the calibration error, the AUROC after the degradations a
marketplace applies (blur, a half-size resize, JPEG 50), the share of blurred reals flagged, and the share of
verdicts that flip after a resize and a re-encoding. `default` repeats the whole command over seeds and gives the
mean and the spread; `leave-one-out` trains without one generator family at a time and tests on it (a generator the
model never saw).

Usage:
    python benchmarks/verdicts.py default --seeds 0 1 2 --out /tmp/verdicts          # the CPU default
    python benchmarks/verdicts.py default --seeds 0 1 2 --gpu --out $OUT/verdicts     # `aipd train --gpu`
    python benchmarks/verdicts.py leave-one-out --gpu --out $OUT/lofo
    python benchmarks/verdicts.py variants --gpu --out $OUT/v strong=TRAIN__AUGMENT__JPEG_PROB=0.8,...

On the GPU machine (mlflow-skinny, no SQLite store) add --file-store; benchmarks/gpu_verdicts.sh does.

Every run gets a work directory of its own under --out (its MLflow store, checkpoints and the report), and the
demo set is built once there and shared. It prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (
    ("minutes", "wall", "{:.1f}"),
    ("auroc", "AUROC", "{:.3f}"),
    ("robust_blur_sigma1", "blur σ1", "{:.3f}"),
    ("robust_downscale_0.5", "0.5x", "{:.3f}"),
    ("robust_jpeg_q50", "JPEG 50", "{:.3f}"),
    ("blurred_real_flag_rate", "blurred reals flagged", "{:.3f}"),
    ("flip_downscale_0.5_then_jpeg_q75", "flips 0.5x+JPEG75", "{:.3f}"),
    ("ece", "ECE", "{:.3f}"),
    ("ece_uncalibrated", "ECE raw", "{:.3f}"),
    ("fpr_at_threshold", "FPR at thr", "{:.3f}"),
    ("tpr_at_threshold", "TPR at thr", "{:.3f}"),
    ("tpr_at_target_fpr", "TPR at 1% (test)", "{:.3f}"),
)


def build_demo(out: Path) -> Path:
    """The default demo set, built once (the same the default `aipd train` builds in its work directory)."""
    data = out / "demo-data"
    if _aipd(["data", "demo", "--out", str(data)], out / "build", out / "build.log").wait() != 0:
        raise SystemExit(f"building the demo set failed; see {out / 'build.log'}")
    return data


@dataclass
class Run:
    """One `aipd train` with every default but the data folder, the seed and the device, in its own work dir."""

    name: str
    data: Path
    work: Path
    seed: int
    gpu: bool
    file_store: bool = False
    env: dict[str, str] = field(default_factory=dict)  # settings of this run (AIPD_* variables)
    started: float = 0.0

    def start(self) -> subprocess.Popen:
        self.started = time.monotonic()
        args = ["train", "--data", str(self.data), "--gpu" if self.gpu else "--no-gpu"]
        env = {"AIPD_TRAIN__SEED": str(self.seed), **self.env}
        if self.file_store:
            env |= {"MLFLOW_ALLOW_FILE_STORE": "true", "AIPD_MLFLOW_TRACKING_URI": (self.work / "mlruns").as_uri()}
        return _aipd(args, self.work, self.work.with_suffix(".log"), env)

    def result(self) -> dict:
        """The test report it wrote, flattened, with its wall time."""
        minutes = (time.monotonic() - self.started) / 60.0
        (report,) = sorted((self.work / "reports").glob("*/evaluation.json"))
        return {**flatten(json.loads(report.read_text())), "minutes": minutes, "seed": self.seed, "name": self.name}


def run_all(runs: list[Run], parallel: int) -> list[dict]:
    """The runs, ``parallel`` at a time (separate local Ray clusters; on a GPU machine they share its GPU)."""
    rows, pending, running = [], list(runs), []
    while pending or running:
        while pending and len(running) < parallel:
            run = pending.pop(0)
            running.append((run, run.start()))
        for run, process in list(running):
            if process.poll() is None:
                continue
            running.remove((run, process))
            if process.returncode != 0:
                raise SystemExit(f"{run.name} failed ({process.returncode}); see {run.work.with_suffix('.log')}")
            rows.append(run.result())
            print(json.dumps(rows[-1]), flush=True)
        time.sleep(2.0)
    return sorted(rows, key=lambda row: row["name"])


def flatten(report: dict) -> dict:
    row = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    row |= {f"robust_{k}": v for k, v in (report.get("robustness") or {}).items()}
    row |= {f"flip_{k}": v for k, v in (report.get("flip_rate") or {}).items()}
    row |= {f"flip_to_ai_{k}": v for k, v in (report.get("flip_to_ai") or {}).items()}
    row |= {f"source_auroc_{k}": v for k, v in (report.get("by_source") or {}).items()}
    row |= {f"source_accuracy_{k}": v for k, v in (report.get("source_accuracy") or {}).items()}
    return row


def _aipd(args: list[str], work: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    work.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "AIPD_WORK_DIR": str(work), "PYTHONUNBUFFERED": "1", **(env or {})}
    for inherited in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        environment.pop(inherited, None)
    with log.open("w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "aipd.cli", *args],
            cwd=ROOT,
            env=environment,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def table(rows: list[dict], label: str) -> str:
    """One line per run, then the mean and the spread (min-max) of each column."""
    head = "| " + " | ".join([label] + [title for _, title, _ in COLUMNS]) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join([row["name"]] + cells) + " |")
    if len(rows) > 1:
        means = []
        for key, _, fmt in COLUMNS:
            values = [row[key] for row in rows if row.get(key) is not None]
            means.append(
                f"{fmt.format(statistics.mean(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"
                if values
                else "-"
            )
        lines.append("| mean (min-max) | " + " | ".join(means) + " |")
    return "\n".join(lines)


def default(args: argparse.Namespace) -> None:
    out = Path(args.out)
    data = build_demo(out)
    runs = [Run(f"seed {seed}", data, out / f"seed-{seed}", seed, args.gpu, args.file_store) for seed in args.seeds]
    rows = run_all(runs, args.parallel)
    (out / "runs.json").write_text(json.dumps(rows, indent=2))
    print(table(rows, "seed"))


def variants(args: argparse.Namespace) -> None:
    """The default command with settings changed, one run each: NAME=SETTING=VALUE[,SETTING=VALUE...], a setting
    as its AIPD_ environment variable without the prefix (TRAIN__AUGMENT__BLUR_PROB=0.5). How far training can go
    against each degradation on this data: a run that sees a degradation on every photo is its oracle."""
    out = Path(args.out)
    data = build_demo(out)
    runs = []
    for spec in args.variant:
        name, _, assignments = spec.partition("=")
        env = {f"AIPD_{key}": value for key, _, value in (a.partition("=") for a in assignments.split(",") if a)}
        runs.append(Run(name, data, out / name, args.seed, args.gpu, args.file_store, env))
    rows = run_all(runs, args.parallel)
    (out / "runs.json").write_text(json.dumps(rows, indent=2))
    print(table(rows, "variant"))


def leave_one_out(args: argparse.Namespace) -> None:
    """For each generator family: train on the others (its AI photos out of train and val), test the reals
    against it alone."""
    out = Path(args.out)
    data = build_demo(out)
    with (data / "manifest.csv").open() as handle:
        manifest = list(csv.DictReader(handle))
    families = sorted({row["generator"] for row in manifest if row["label"] == "ai_generated"})
    runs = []
    for family in families:
        kept = [
            row
            for row in manifest
            if row["label"] == "real" or (row["generator"] == family) == (row["split"] == "test")
        ]
        held_out = out / f"without-{family}.csv"
        with held_out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "label", "split", "generator"])
            writer.writeheader()
            for row in kept:
                writer.writerow({**{k: row[k] for k in ("label", "split", "generator")}, "path": data / row["path"]})
        runs.append(Run(f"unseen: {family}", held_out, out / f"without-{family}", args.seed, args.gpu, args.file_store))
    rows = run_all(runs, args.parallel)
    (out / "runs.json").write_text(json.dumps(rows, indent=2))
    print(table(rows, "held-out family"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    first = sub.add_parser("default", help="`aipd train` with every default, over seeds")
    first.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    second = sub.add_parser("leave-one-out", help="train without one generator family, test on it, for each")
    second.add_argument("--seed", type=int, default=0)
    third = sub.add_parser("variants", help="the default command with settings changed, one run per variant")
    third.add_argument("--seed", type=int, default=0)
    third.add_argument("variant", nargs="+", help="NAME=SETTING=VALUE[,SETTING=VALUE...]")
    for command in (first, second, third):
        command.add_argument("--gpu", action="store_true", help="train on the GPU (`aipd train --gpu`)")
        command.add_argument("--out", required=True, help="folder for the runs, their logs and runs.json")
        command.add_argument("--parallel", type=int, default=1, help="runs at a time (each its own local cluster)")
        command.add_argument("--file-store", action="store_true", help="MLflow on a file store (mlflow-skinny)")
    args = parser.parse_args()
    {"default": default, "leave-one-out": leave_one_out, "variants": variants}[args.mode](args)


if __name__ == "__main__":
    main()
