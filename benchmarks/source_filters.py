"""Which residual filter the source head's 2-periodic correlations should read: the shipped fit on other filters.

Why: the source head is fitted after training on fixed statistics of the photo (`training/source_head.py`), so which
statistics it gets can be compared without training a model: the same fit (class-balanced logistic regression, its
penalty chosen by 4-fold cross-validation on the training split) on the residual spectrum and the correlations of
`app.model.ResidualPhase`, with the correlations computed on another high-pass filter beside (or instead of) the
stem's 3 x 3 mean. The choice is made on the training split's cross-validated balanced accuracy; the test split's
top-1 per family is printed beside it, for the record, not for choosing.

    python benchmarks/source_filters.py --data /tmp/source-filters   # builds the default demo set there first
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Depthwise kernels (per channel), each a high-pass whose output the correlations are computed on.
KERNELS: dict[str, list[list[float]]] = {
    "mean3": [[-1 / 9] * 3, [-1 / 9, 8 / 9, -1 / 9], [-1 / 9] * 3],  # the stem's
    "diff_h": [[0, 0, 0], [0, 1, -1], [0, 0, 0]],
    "diff_v": [[0, 0, 0], [0, 1, 0], [0, -1, 0]],
    "second_h": [[0, 0, 0], [1, -2, 1], [0, 0, 0]],
    "second_v": [[0, 1, 0], [0, -2, 0], [0, 1, 0]],
    "laplace": [[0, 1, 0], [1, -4, 1], [0, 1, 0]],
    "kv5": [  # the SRM "KV" 5 x 5 residual (Fridrich & Kodovsky 2012)
        [-1, 2, -2, 2, -1],
        [2, -6, 8, -6, 2],
        [-2, 8, -12, 8, -2],
        [2, -6, 8, -6, 2],
        [-1, 2, -2, 2, -1],
    ],
}


class FixedFilter(nn.Module):
    def __init__(self, kernel: list[list[float]]) -> None:
        super().__init__()
        weight = torch.tensor(kernel, dtype=torch.float32)
        self.pad = weight.shape[0] // 2
        self.register_buffer("kernel", weight.expand(3, 1, *weight.shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (self.pad,) * 4, mode="reflect")
        return F.conv2d(padded, self.kernel, groups=3)


# even offsets: the 2 x 2 grid of the center crop, elsewhere (AIPD_SHIFTS=2: the two along the main diagonal)
SHIFTS = ((0, 0), (16, 16)) if os.environ.get("AIPD_SHIFTS") == "2" else ((0, 0), (0, 16), (16, 0), (16, 16))


def crops(data: Path, crop: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """Each split's evaluation crops (uint8 NHWC) and source classes, in file order; "<split>_shifted" holds each
    photo's crops at SHIFTS of a (crop + 16) center crop, the evaluation crop being the one at (8, 8)."""
    from app.config import Settings
    from app.data import index_dataset, source_targets
    from app.images import read_and_decode
    from app.transforms import eval_preprocess

    index = index_dataset(str(data))
    families = index.source_families()
    limits = Settings().images
    images, classes = {}, {}
    for split in ("train", "val", "test"):
        records = index.split(split).sort_values("path")
        targets = source_targets(records, families)
        keep = targets >= 0
        paths = records["path"][keep].tolist()
        photos = [read_and_decode(p, limits) for p in paths]
        images[split] = np.stack([eval_preprocess(photo, crop) for photo in photos])
        classes[split] = targets[keep]
        wide = [eval_preprocess(photo, crop + 16) for photo in photos]
        images[f"{split}_shifted"] = np.stack([w[y : y + crop, x : x + crop] for y, x in SHIFTS for w in wide])
        classes[f"{split}_shifted"] = np.tile(targets[keep], len(SHIFTS))
    return images, classes, families


def statistics(images: np.ndarray, filters: list[tuple[str, int]], spectrum: int = 16) -> np.ndarray:
    """The spectrum the model reads, then the correlations on each (filter, lags) asked for."""
    from app.model import ResidualPhase, ResidualSpectrum
    from app.transforms import to_model_input

    modules: list[nn.Module] = [ResidualSpectrum(spectrum)] if spectrum else []
    for name, lags in filters:
        phase = ResidualPhase(lags)
        phase.highpass = FixedFilter(KERNELS[name])
        modules.append(phase)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), 128):
            x = to_model_input(images[start : start + 128])
            out.append(torch.cat([m(x) for m in modules], dim=1).double().numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="where the default demo set is (built if absent)")
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument(
        "--variants",
        default="mean3:5;mean3:3;mean3:5+diff_h:3+diff_v:3;mean3:5+second_h:3+second_v:3;mean3:5+laplace:3;"
        "mean3:5+kv5:3;kv5:5;laplace:5",
        help="';'-separated variants, each '+'-joined filter:lags pairs",
    )
    parser.add_argument(
        "--fits",
        default="train",
        help="','-separated: what the head is fitted on with the variant's C (train, train+val, train+shifted, "
        "train+val+shifted: the shifted crops added to the evaluation crops)",
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    from app.config import Settings
    from app.demo import build_demo_dataset
    from training.source_head import choose_c, fit_linear_head

    started = time.perf_counter()
    data = Settings().data  # the set the default `aipd train` builds
    build_demo_dataset(args.data, data.demo_images_per_class, data.demo_size, data.demo_seed)
    images, classes, families = crops(args.data, args.crop)
    print(f"crops: {len(classes['train'])} train, {len(classes['test'])} test ({time.perf_counter() - started:.0f} s)")
    rows = []
    for variant in args.variants.split(";"):
        filters = [(name, int(lags)) for name, lags in (part.split(":") for part in variant.split("+"))]
        started = time.perf_counter()
        fits = args.fits.split(",")
        parts = {p for fit in fits for p in fit.split("+")} | {"train"}
        parts |= {f"{p}_shifted" for p in ("train", "val") if "shifted" in parts and p in parts}
        stats = {p: statistics(images[p], filters) for p in parts - {"shifted"} | {"test"}}
        c, cv = choose_c(stats["train"], classes["train"], len(families))  # on the evaluation crops of train only
        for fit in fits:
            chosen = fit.split("+")
            used = [p for p in chosen if p != "shifted"]
            used += [f"{p}_shifted" for p in used if "shifted" in chosen]
            x = np.concatenate([stats[p] for p in used])
            y = np.concatenate([classes[p] for p in used])
            weight, bias = fit_linear_head(x, y, len(families), c)
            picked = (stats["test"] @ weight.double().numpy().T + bias.double().numpy()).argmax(axis=1)
            per_family = {f: float(np.mean(picked[classes["test"] == k] == k)) for k, f in enumerate(families)}
            name = variant if fit == "train" else f"{variant}, fitted on {fit}"
            rows.append({"variant": name, "width": x.shape[1], "c": c, "cv_balanced": cv, "test": per_family})
        print(f"{variant}: cv {cv:.3f}, c {c}, {time.perf_counter() - started:.0f} s", flush=True)
    print("\n| filters:lags | inputs | C | balanced accuracy, 4-fold CV on train | " + " | ".join(families) + " |")
    print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in families) + " |")
    for row in rows:
        cells = " | ".join(f"{row['test'][f]:.3f}" for f in families)
        print(f"| {row['variant']} | {row['width']} | {row['c']} | {row['cv_balanced']:.3f} | {cells} |")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
