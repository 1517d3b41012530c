"""Would richer residual statistics, or a nonlinear model on them, lift the residual verdict?

Why this measurement: the residual verdict (training/residual_verdict.py) blends the network's logit with a linear
model on fixed residual statistics (a 16 x 16 log spectrum and 2-periodic correlations up to 5 pixels); on the demo
data it stops near AUROC 0.98 clean and 0.71 after a 0.5x downscale, below the GPU targets. This refits that
verdict on a trained checkpoint with other statistics (a finer spectrum, longer correlations, one spectrum per
colour channel) and other models (a weaker penalty, a small MLP), each fitted exactly as the shipped one is (training
photos clean and once degraded, the blend on validation), and scores each on the test split clean and degraded.
Where none of them moves the blend, the limit is the evidence these photos keep, not the choice of statistics.

Usage:
    python benchmarks/residual_features.py --checkpoint .aipd/checkpoints/<run_id> --data .aipd/demo-data
It prints a Markdown table last (AUROC of each model alone and blended with the network's logit).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

TEST_VARIANTS = ("blur_sigma1", "downscale_0.5", "jpeg_q50")


def statistic_modules() -> dict[str, Any]:
    """Every candidate statistic, computed once per crop; the feature sets below concatenate them."""
    from app.model import ResidualPhase, ResidualSpectrum

    return {
        "spectrum16": ResidualSpectrum(16),
        "spectrum24": ResidualSpectrum(24),
        "spectrum32": ResidualSpectrum(32),
        "phase5": ResidualPhase(5),
        "phase7": ResidualPhase(7),
        "phase8": ResidualPhase(8),
    }


# name -> the statistics it concatenates ("channels16": the 16 x 16 spectrum of each colour channel's residual)
FEATURE_SETS = {
    "shipped: spectrum 16 + correlations 5": ("shipped",),
    "spectrum 32 + correlations 5": ("spectrum32", "phase5"),
    "spectrum 16 + correlations 8": ("spectrum16", "phase8"),
    "spectrum 24 + correlations 7": ("spectrum24", "phase7"),
    "spectrum 16 per channel + correlations 5": ("channels16", "phase5"),
}


def read_columns(modules: dict[str, Any]) -> Callable[[Any, Any], dict[str, Any]]:
    from training.residual_verdict import network_logit

    def read(model: Any, x: Any) -> dict[str, Any]:
        columns = {
            "logit": network_logit(model, x),
            "shipped": model.residual_statistics(x),
        }
        for name, module in modules.items():
            columns[name] = module.to(x.device)(x)
        columns["channels16"] = _per_channel(modules["spectrum16"], x)
        return columns

    return read


def _per_channel(spectrum: Any, x: Any) -> Any:
    """Each colour channel's spectrum: the module averages the residual over the channels it is given."""
    import torch

    return torch.cat([spectrum(x[:, [c, c, c]]) for c in range(x.shape[1])], dim=1)


def features(rows: Any, names: tuple[str, ...]) -> np.ndarray:
    return np.concatenate([rows.columns[name] for name in names], axis=1)


def linear(c: float) -> Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """The shipped fit (fit_linear_head) at inverse penalty ``c``; returns the logit of a fitted model."""
    from training.linear_head import fit_binary_logit

    def fit(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        w, b = fit_binary_logit(x, y, c)
        return lambda z: z @ w + b

    return fit


def mlp(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A one-hidden-layer network (64 units, weight decay, early stopping on a tenth of the rows)."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-2, early_stopping=True, max_iter=300, random_state=0),
    ).fit(x, y)

    def logit(z: np.ndarray) -> np.ndarray:
        p = np.clip(model.predict_proba(z)[:, 1], 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p))

    return logit


def evaluate(
    fit: Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]],
    names: tuple[str, ...],
    train: Any,
    val: Any,
    test: Any,
) -> tuple[list[float], list[float]]:
    """AUROC on each test variant (clean first) of the model alone and of its blend with the network's logit, the
    blend fitted on validation as the shipped one is."""
    from app.scoring import auroc
    from training.linear_head import fit_binary_logit
    from training.residual_verdict import BLEND_C

    model = fit(features(train, names), train.labels)
    residual = model(features(val, names))
    w, b = fit_binary_logit(np.column_stack([val.columns["logit"], residual]), val.labels, BLEND_C)
    test_residual = model(features(test, names))
    blended = np.column_stack([test.columns["logit"], test_residual]) @ w + b
    alone, blend = [], []
    for variant in ("", *TEST_VARIANTS):
        rows = test.variants == variant
        alone.append(auroc(test.labels[rows], test_residual[rows]))
        blend.append(auroc(test.labels[rows], blended[rows]))
    return alone, blend


def main() -> None:
    from app.config import load_settings
    from app.data import index_dataset
    from app.degradations import PhotoChain, sweep
    from app.model import load_checkpoint
    from app.ray_runtime import init_ray
    from app.scoring import auroc
    from training.crop_rows import read_crop_rows
    from training.residual_verdict import (
        DEGRADED,
        RESIDUAL_FIT_DEGRADATIONS,
        RESIDUAL_FIT_SEED,
        RESIDUAL_VERDICT_C,
        fit_sample,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint with residual statistics")
    parser.add_argument("--data", required=True, help="the dataset it was trained on (train, val and test splits)")
    args = parser.parse_args()
    settings = load_settings()
    init_ray(settings, include_dashboard=False)
    loaded = load_checkpoint(args.checkpoint)
    if not loaded.model.has_residual_statistics:
        raise SystemExit(f"{args.checkpoint} computes no residual statistics")
    index = index_dataset(args.data)
    read = read_columns(statistic_modules())
    fit_variants = (("", None), (DEGRADED, PhotoChain(RESIDUAL_FIT_DEGRADATIONS, RESIDUAL_FIT_SEED)))
    started = time.perf_counter()
    train = read_crop_rows(loaded, fit_sample(index.split("train")), settings, fit_variants, read)
    val = read_crop_rows(loaded, index.split("val"), settings, fit_variants, read)
    test_variants = (("", None), *sweep(list(TEST_VARIANTS)).items())
    test = read_crop_rows(loaded, index.split("test"), settings, test_variants, read)
    crops = len(train.labels) + len(val.labels) + len(test.labels)
    print(f"read {crops} crops in {time.perf_counter() - started:.0f} s", flush=True)

    header = ["clean", *TEST_VARIANTS]
    lines = [
        "| statistics | model | width | " + " | ".join(f"{h} alone | {h} blend" for h in header) + " |",
        "| --- | --- | --- |" + " --- | --- |" * len(header),
    ]
    picks = [test.variants == variant for variant in ("", *TEST_VARIANTS)]
    head = [auroc(test.labels[rows], test.columns["logit"][rows]) for rows in picks]
    lines.append("| (the network's logit alone) | | | " + " | ".join(f"{a:.3f} | -" for a in head) + " |")
    models: list[tuple[str, tuple[str, ...], str, Any]] = []
    for label, names in FEATURE_SETS.items():
        models.append((label, names, f"linear C={2 * RESIDUAL_VERDICT_C:g} (shipped)", linear(RESIDUAL_VERDICT_C)))
    shipped = FEATURE_SETS["shipped: spectrum 16 + correlations 5"]
    models.append(("shipped: spectrum 16 + correlations 5", shipped, "linear C=0.03", linear(0.015)))
    models.append(("shipped: spectrum 16 + correlations 5", shipped, "MLP 64", mlp))
    for label, names, model_name, fit in models:
        alone, blend = evaluate(fit, names, train, val, test)
        width = features(test, names).shape[1]
        cells = " | ".join(f"{a:.3f} | {b:.3f}" for a, b in zip(alone, blend, strict=True))
        lines.append(f"| {label} | {model_name} | {width} | {cells} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
