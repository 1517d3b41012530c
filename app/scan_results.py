"""Reading a catalog scan's output, and what a person wants to see of it: counts, the probability histogram, the
most suspicious files and, for a labelled catalog, how well the verdicts match.

In `app` because two floors read it: `aipd scan --report` (serving/scan_report.py) and the UI's scan page, which
talks to no service and must not import serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

# One row per input file of a scan. `label` is the manifest's (-1 when none), so a labelled scan can be scored.
COLUMNS = (
    "path",
    "prediction",
    "probability",
    "confidence",
    "threshold",
    "model_version",
    "width",
    "height",
    "bytes",
    "sha256",
    "error",
    "detail",
    "label",
    "source",  # the source head's most likely generator family ("none": a camera); null for a model without one
    "source_score",  # its probability
    "c2pa",  # the C2PA manifest's state: absent, valid, invalid, unreadable, remote, too_large, timeout, unavailable
    "ai_declared",  # a manifest that verifies declares generative media
    "ai_hinted_unsigned",  # only unverified evidence (unsigned metadata, a failing manifest) says generative media
)
HISTOGRAM_BINS = 20


def output_files(out: str) -> list[tuple[str, Any]]:
    """The Parquet files of a scan's output folder (local path or any URI pyarrow reads), with their filesystem."""
    import pyarrow.fs as pafs

    from app.storage import filesystem_of

    fs, root = filesystem_of(out)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    return [(info.path, fs) for info in infos if info.type == pafs.FileType.File and info.path.endswith(".parquet")]


def read_results(out: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Every row of a scan's output over all its runs (the latest row per path); unreadable files are left out."""
    import pyarrow.parquet as pq

    frames = []
    for file_path, fs in output_files(out):
        try:
            frames.append(pq.read_table(file_path, columns=columns, filesystem=fs).to_pandas())
        except Exception:  # noqa: BLE001 - a file cut short by a stopped scan; its files are scanned again
            continue
    if not frames:
        return pd.DataFrame(columns=columns or list(COLUMNS))
    return pd.concat(frames, ignore_index=True).drop_duplicates("path", keep="last").reset_index(drop=True)


@dataclass
class ScanOverview:
    files: int
    verdicts: dict[str, int]  # real, ai_generated, error
    errors: dict[str, int]  # by error code
    histogram: list[int]  # files per probability bin, HISTOGRAM_BINS bins over [0, 1]
    threshold: float | None
    model_versions: list[str]
    suspicious: pd.DataFrame  # the top files by probability: path, probability, prediction, confidence
    scores: dict[str, float] = field(default_factory=dict)  # auroc, accuracy, n for a labelled scan
    provenance: dict[str, int] = field(default_factory=dict)  # provenance_counts; empty for an output without them
    sources: dict[str, int] = field(default_factory=dict)  # files per most likely generator family

    @property
    def bin_edges(self) -> list[float]:
        return [i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)]


def overview(results: pd.DataFrame, top: int = 24) -> ScanOverview:
    """The summary both the HTML report and the UI page show."""
    ok = results[results["error"].isna() & results["probability"].notna()]
    probabilities = ok["probability"].to_numpy(dtype=np.float64)
    histogram, _ = np.histogram(probabilities, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    verdicts = {name: int((ok["prediction"] == name).sum()) for name in ("real", "ai_generated")}
    verdicts["error"] = int(len(results) - len(ok))
    failed = results[results["error"].notna()]
    suspicious = ok.sort_values("probability", ascending=False).head(top)
    thresholds = ok["threshold"].dropna().unique()
    scores: dict[str, float] = {}
    labelled = ok[ok["label"].fillna(-1).astype(int) >= 0] if "label" in ok else ok.iloc[0:0]
    if not labelled.empty:
        from app.scoring import auroc

        labels = labelled["label"].astype(int).to_numpy()
        flagged = (labelled["prediction"] == "ai_generated").to_numpy()
        scores = {
            "auroc": auroc(labels, labelled["probability"].to_numpy(dtype=np.float64)),
            "accuracy": float((flagged == (labels == 1)).mean()),
            "n": float(len(labelled)),
        }
    return ScanOverview(
        provenance=provenance_counts(results),
        sources={str(k): int(v) for k, v in ok["source"].dropna().value_counts().items()} if "source" in ok else {},
        files=int(len(results)),
        verdicts=verdicts,
        errors={str(k): int(v) for k, v in failed["error"].value_counts().items()},
        histogram=[int(v) for v in histogram],
        threshold=float(thresholds[0]) if len(thresholds) else None,
        model_versions=sorted(str(v) for v in results["model_version"].dropna().unique()),
        suspicious=suspicious[["path", "probability", "prediction", "confidence"]].reset_index(drop=True),
        scores=scores,
    )


def provenance_counts(results: pd.DataFrame) -> dict[str, int]:
    """Files whose C2PA manifest is there, verifies or fails, and that declare or only hint at generative media;
    empty for the output of a scan that read no provenance (an older one)."""
    if "c2pa" not in results:
        return {}
    state = results["c2pa"]
    present = state.notna() & ~state.isin(["absent", "unavailable"])
    return {
        "c2pa_present": int(present.sum()),
        "c2pa_valid": int((state == "valid").sum()),
        "c2pa_invalid": int(state.isin(["invalid", "unreadable"]).sum()),
        "ai_declared": int(results["ai_declared"].fillna(False).astype(bool).sum()),
        "ai_hinted_unsigned": int(results["ai_hinted_unsigned"].fillna(False).astype(bool).sum()),
    }


def thumbnail_png(path: str, side: int = 160, max_bytes: int = 10 * 1024 * 1024) -> bytes | None:
    """A small PNG of an image file for the report and the page; None when the file is gone or unreadable."""
    import io

    from app.images import ImageError, decode_image, read_image_bytes

    try:
        image = decode_image(read_image_bytes(path, max_bytes=max_bytes), max_bytes=max_bytes)
    except (ImageError, OSError):
        return None
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
