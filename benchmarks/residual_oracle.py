"""Can any detector pass a degradation on this data? An oracle on the high-pass residual.

Why this measurement: the detector's AUROC after blur sigma 1 or a 0.5x downscale stays near 0.65 even for models
trained with that degradation on every photo (benchmarks/RESULTS.md, "Verdicts"). This asks the data instead of the
model: for each degradation, a logistic regression on the log power spectrum of the forensic stem's residual (the
photo minus its 3x3 local mean, where the generators' upsampling leaves periodic peaks) is fitted on the degraded
training split and scored on the degraded test split, each photo cropped as evaluation crops it. The oracle sees the
degradation in training and needs no feature learning; when it too falls near chance, the degradation has removed
the evidence from these photos, and no training recipe of the detector could bring it back.

With --checkpoint it also asks where the generator family is written: a linear probe for the family of each AI
photo, on the checkpoint's pooled backbone features and on the same residual spectrum (top-1 per family on test).

Usage:
    python benchmarks/residual_oracle.py --data .aipd/demo-data            # the demo set `aipd train` builds
    python benchmarks/residual_oracle.py --data .aipd/demo-data --checkpoint .aipd/checkpoints/<run_id>
It prints Markdown tables last.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from app.degradations import Chain, sweep

VARIANTS = ("clean", "blur_sigma1", "downscale_0.5", "jpeg_q50", "downscale_0.5_then_jpeg_q75")
POOL = 4  # spectrum bins of POOL x POOL frequencies: 784 features for a 112-px crop


def residual_spectrum(crop: np.ndarray) -> np.ndarray:
    """The log power spectrum of a crop's high-pass residual (grey), averaged over POOL x POOL frequency bins."""
    from scipy.ndimage import uniform_filter

    grey = crop.astype(np.float64).mean(axis=2) / 255.0
    residual = grey - uniform_filter(grey, size=3, mode="reflect")
    power = np.log(np.abs(np.fft.fftshift(np.fft.fft2(residual))) ** 2 + 1e-12)
    side = power.shape[0] // POOL * POOL
    return power[:side, :side].reshape(side // POOL, POOL, side // POOL, POOL).mean(axis=(1, 3)).ravel()


def features(paths: list[str], change: Chain | None, crop_size: int) -> np.ndarray:
    from PIL import Image

    from app.transforms import eval_preprocess

    rows = []
    for path in paths:
        with Image.open(path) as image:
            photo = image.convert("RGB")
        rows.append(residual_spectrum(eval_preprocess(change(photo) if change else photo, crop_size)))
    return np.stack(rows)


def probe(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The test predictions of a standardised L2 logistic regression fitted on ``train``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)).fit(*train).predict(test[0])


def family_probe(splits: dict, checkpoint: str, crop_size: int) -> list[str]:
    """Top-1 accuracy per family of a linear probe on the AI photos: backbone features against residual spectra."""
    import torch
    from PIL import Image

    from app.data import source_targets
    from app.model import load_checkpoint
    from app.transforms import eval_preprocess, to_model_input

    loaded = load_checkpoint(checkpoint)
    families = list(loaded.model_cfg.source_families)
    if not families:
        raise SystemExit(f"{checkpoint} has no source head: its families are unknown")
    model = loaded.model.eval()
    inputs = {}
    for name, split in splits.items():
        ai = split[split["label"] == 1]
        crops = []
        for path in ai["path"]:
            with Image.open(path) as image:
                crops.append(eval_preprocess(image.convert("RGB"), crop_size))
        with torch.inference_mode():
            pooled = np.concatenate(
                [
                    model.backbone(model.stem(to_model_input(np.stack(crops[i : i + 64])))).numpy()
                    for i in range(0, len(crops), 64)
                ]
            )
        spectra = np.stack([residual_spectrum(crop) for crop in crops])
        inputs[name] = (pooled, spectra, source_targets(ai, families))
    lines = ["| features | " + " | ".join(families[1:]) + " |", "| --- |" + " --- |" * (len(families) - 1)]
    for column, label in ((0, "the detector's pooled features"), (1, "the residual's log spectrum")):
        truth = inputs["test"][2]
        guess = probe((inputs["train"][column], inputs["train"][2]), (inputs["test"][column], truth))
        cells = [f"{np.mean(guess[truth == k] == k):.3f}" for k in range(1, len(families))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def oracle_auroc(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from app.scoring import auroc

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=5000))
    model.fit(*train)
    return auroc(test[1], model.predict_proba(test[0])[:, 1])


def mixture_oracle(splits: dict, changes: dict, crop_size: int, seed: int = 0) -> list[str]:
    """One model for all degradations, as a deployed detector must be: what a linear model on the residual keeps
    when it cannot know which degradation a photo went through."""
    from app.degradations import DegradationConfig, sample_chain

    rng = np.random.default_rng(seed)
    config = DegradationConfig(blur_prob=0.5, downscale_prob=0.5, jpeg_prob=0.5)
    train = splits["train"]
    paths, labels = list(train["path"]), train["label"].to_numpy()
    degraded = np.stack([features([path], sample_chain(rng, config), crop_size)[0] for path in paths])
    fit = (np.concatenate([features(paths, None, crop_size), degraded]), np.concatenate([labels, labels]))
    lines = ["| test split | mixture oracle AUROC |", "| --- | --- |"]
    for name in VARIANTS:
        test = (features(list(splits["test"]["path"]), changes[name], crop_size), splits["test"]["label"].to_numpy())
        lines.append(f"| {name} | {oracle_auroc(fit, test):.3f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    from app.data import index_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a dataset with train and test splits (the demo set)")
    parser.add_argument("--crop", type=int, default=112, help="the crop evaluation takes (train.crop_size)")
    parser.add_argument("--checkpoint", help="a checkpoint with a source head: probe where the family is written")
    parser.add_argument(
        "--mixture",
        action="store_true",
        help="also one oracle for every degradation: fitted on each training photo clean and once degraded by a "
        "chain drawn as training draws them (every kind at 0.5), scored on each degraded test split",
    )
    args = parser.parse_args()
    index = index_dataset(args.data)
    splits = {name: index.split(name) for name in ("train", "test")}
    changes = {"clean": None, **sweep(list(VARIANTS[1:]))}
    lines = ["| degradation (train and test alike) | oracle AUROC on test |", "| --- | --- |"]
    for name in VARIANTS:
        started = time.perf_counter()
        train, test = (
            (features(list(split["path"]), changes[name], args.crop), split["label"].to_numpy())
            for split in splits.values()
        )
        value = oracle_auroc(train, test)
        print(f"{name}: {value:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
        lines.append(f"| {name} | {value:.3f} |")
    if args.mixture:
        lines += ["", *mixture_oracle(splits, changes, args.crop)]
    if args.checkpoint:
        lines += ["", *family_probe(splits, args.checkpoint, args.crop)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
