"""Tuning on one GPU: the same trials packed onto the card with fractional GPUs, against one after another.

Why this is measured: one trial of this model (EfficientNet-B0 at 96-112 px, batch 32-64) leaves most of a large
card idle, so packing several trials onto it should cut the wall time of a search. The ratio says by how much, and
whether something else (the trials' Ray Data pipelines on the host's cores, Train start-up) becomes the limit.

Both runs go through ``tuning.tune.run_tuning`` (the code ``aipd tune`` runs) with:
  - the same ``--trials`` configurations (random search over the default space with a fixed seed),
  - the FIFO scheduler (no early stopping, so both runs do the same work), 1 Train worker per trial,
  - the same data (``--files`` JPEGs of ``--side`` px, written once) and ``--epochs`` per trial.
  (a) packed:     gpus_per_trial = 1 / trials, max_concurrent = trials
  (b) sequential: gpus_per_trial = 1,          max_concurrent = 1
Reported per run: the wall time of the Tune run (``Tuner.fit``, the number compared), the whole command's wall time
(data indexing, MLflow, registering the best model included), and each trial's best validation AUROC. The ratio is
sequential / packed; the card's name comes from ``nvidia-smi``.

Usage (GPU machine):  python benchmarks/tune_gpu.py --out "$OUT/tune_gpu.json"
A CPU smoke run:      python benchmarks/tune_gpu.py --device cpu --trials 2 --files 200 --side 64 --epochs 1 \
                          --crop 48 --batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "none"
    except (OSError, subprocess.TimeoutExpired):
        return "none"


def make_data(folder: Path, files: int, side: int) -> None:
    """Written once: the training-throughput benchmark's synthetic photos (real: sharpened, AI: smoothed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import make_files

    make_files(folder, files, side)


def run_mode(mode: str, args: argparse.Namespace, stamp: str) -> dict:
    from app.config import load_settings
    from tuning.tune import run_tuning

    packed = mode == "packed"
    use_gpu = args.device != "cpu"
    tune = {
        "name": f"bench-{mode}-{stamp}",
        "num_samples": args.trials,
        "epochs": args.epochs,
        "search_alg": "random",
        "scheduler": "fifo",
        "max_concurrent": args.trials if packed else 1,
        "gpus_per_trial": (1.0 / args.trials if packed else 1.0) if use_gpu else 0.0,
        "cpus_per_trial": args.cpus_per_trial,
    }
    if args.crop:
        tune["crop_size"] = [args.crop]
    if args.batch:
        tune["batch_size"] = [args.batch]
    settings = load_settings(
        work_dir=args.work_dir / mode,
        data={"path": str(args.data_dir)},
        log_format="console",
        train={"num_workers": 1, "use_gpu": use_gpu, "seed": 0},
        tune=tune,
    )
    started = time.perf_counter()
    outcome = run_tuning(settings)
    wall_s = time.perf_counter() - started
    return {
        "mode": mode,
        "max_concurrent": tune["max_concurrent"],
        "gpus_per_trial": tune["gpus_per_trial"],
        "tune_fit_wall_s": round(outcome.fit_wall_s, 2),
        "command_wall_s": round(wall_s, 2),
        "trials": [
            {
                "trial": t.trial_id,
                "params": t.params,
                "best_val_auroc": t.best_val_auroc,
                "epochs_run": t.epochs_run,
                "status": t.status,
            }
            for t in outcome.trials
        ],
        "best_val_auroc": round(outcome.val_auroc, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--crop", type=int, default=None, help="fix the crop size (default: the search space's)")
    parser.add_argument("--batch", type=int, default=None, help="fix the batch size (default: the search space's)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--device", default="cuda", help="cuda or cpu (smoke run)")
    parser.add_argument("--order", default="packed,sequential", help="which runs, in this order")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/aipd-tune-bench/data"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/aipd-tune-bench/work"))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    make_data(args.data_dir, args.files, args.side)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = [run_mode(mode, args, stamp) for mode in args.order.split(",")]
    by_mode = {r["mode"]: r for r in runs}
    results = {
        "benchmark": "tune_gpu",
        "gpu": gpu_name(),
        "host": platform.node(),
        "trials": args.trials,
        "epochs": args.epochs,
        "files": args.files,
        "side": args.side,
        "runs": runs,
    }
    if {"packed", "sequential"} <= set(by_mode):
        results["speedup_sequential_over_packed"] = round(
            by_mode["sequential"]["tune_fit_wall_s"] / by_mode["packed"]["tune_fit_wall_s"], 2
        )
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    print(
        "| card | trials x epochs | packed: GPU/trial, concurrent | wall s "
        "| sequential: GPU/trial, concurrent | wall s | ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    p, s = by_mode.get("packed"), by_mode.get("sequential")
    if p and s:
        print(
            f"| {results['gpu']} | {args.trials} x {args.epochs} | {p['gpus_per_trial']:.3g}, {p['max_concurrent']} | "
            f"{p['tune_fit_wall_s']:.0f} | {s['gpus_per_trial']:.3g}, {s['max_concurrent']} | "
            f"{s['tune_fit_wall_s']:.0f} | "
            f"{results['speedup_sequential_over_packed']:.2f}x |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
