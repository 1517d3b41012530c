"""Which short training schedule gives the best demo model: a grid of epochs x learning rate x batch size.

Why this is measured: `make demo` must answer within 10 minutes of a fresh clone on 2 CPU cores, which leaves time
for about 6 epochs over the demo set, and the default schedule (9 epochs, batch 64, lr 2e-3) was chosen for
`aipd train`. With few epochs, the number of optimiser steps and the learning rate matter more than usual, so the
grid looks for the schedule that learns most in a fixed number of epochs (the CPU cost of an epoch hardly depends on
the batch size). Trials run side by side on one GPU (the ranking, not the speed, is what is compared here);
the chosen schedule is then confirmed on the CPU by the demo itself.

Every trial goes through ``tuning.tune.run_tuning`` (the code ``aipd tune`` runs) with the FIFO scheduler (no early
stopping), 1 Train worker, seed 0, on the default demo set (built here). Reported: each trial's best and last
validation AUROC (360 validation images, so differences under ~0.02 are noise).

Usage (GPU machine):  python benchmarks/demo_schedule.py --epochs 4,6 --lr 2e-3,4e-3 --batch 32,64 --out $OUT/s.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def run_grid(epochs: int, args: argparse.Namespace, stamp: str) -> list[dict]:
    from mlflow import MlflowClient
    from ray import tune

    from app.config import load_settings
    from tuning.tune import run_tuning

    use_gpu = args.gpus_per_trial > 0
    settings = load_settings(
        work_dir=args.work_dir / f"{stamp}-e{epochs}",
        data={"path": str(args.data_dir)},
        log_format="console",
        train={"num_workers": 1, "use_gpu": use_gpu, "seed": 0},
        tune={
            "name": f"schedule-{stamp}-e{epochs}",
            "num_samples": 1,
            "epochs": epochs,
            "scheduler": "fifo",
            "max_concurrent": args.concurrent,
            "gpus_per_trial": args.gpus_per_trial,
        },
    )
    space = {
        "lr": tune.grid_search(args.lr),
        "batch_size": tune.grid_search(args.batch),
        "weight_decay": settings.train.weight_decay,
        "dropout": settings.model.dropout,
        "crop_size": settings.train.crop_size,
        "augment_prob": None,
    }
    outcome = run_tuning(settings, search_space=space)
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    rows = []
    for trial in outcome.trials:
        history = (
            sorted(client.get_metric_history(trial.run_id, "val_auroc"), key=lambda m: m.step) if trial.run_id else []
        )
        rows.append(
            {
                "epochs": epochs,
                "lr": trial.params["lr"],
                "batch_size": trial.params["batch_size"],
                "best_val_auroc": trial.best_val_auroc,
                "epochs_run": trial.epochs_run,
                "val_auroc_by_epoch": [round(m.value, 4) for m in history],
                "status": trial.status,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=ints, default=[4, 6])
    parser.add_argument("--lr", type=floats, default=[2e-3, 4e-3])
    parser.add_argument("--batch", type=ints, default=[32, 64])
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--gpus-per-trial", type=float, default=0.25, help="0 runs on the CPU")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/aipd-schedule/data/demo-1200x128-s0"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/aipd-schedule/work"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from app.demo import build_demo_dataset
    from benchmarks.tune_gpu import gpu_name

    started = time.perf_counter()
    build_demo_dataset(args.data_dir)
    print(f"demo data ready in {time.perf_counter() - started:.0f} s", flush=True)
    stamp = time.strftime("%H%M%S")
    rows = [row for epochs in args.epochs for row in run_grid(epochs, args, stamp)]
    card = gpu_name() if args.gpus_per_trial > 0 else "cpu"
    print("| card | epochs | lr | batch | best val AUROC | last val AUROC | status |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: (r["epochs"], r["lr"], r["batch_size"])):
        last = r["val_auroc_by_epoch"][-1] if r["val_auroc_by_epoch"] else float("nan")
        print(
            f"| {card} | {r['epochs']} | {r['lr']:g} | {r['batch_size']} | {r['best_val_auroc'] or 0:.4f} | "
            f"{last:.4f} | {r['status']} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "demo_schedule", "card": card, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
