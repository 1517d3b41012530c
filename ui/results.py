"""How results read to a person: verdict labels, the batch table and its CSV, apart from the page to be testable."""

from __future__ import annotations

import pandas as pd

from app.client import FileResult, ServiceError

VERDICT_LABELS = {"ai_generated": "AI-generated", "real": "Real photo"}

COLUMNS = [
    "file",
    "verdict",
    "probability_ai_generated",
    "confidence",
    "threshold",
    "model_version",
    "server_latency_ms",
    "round_trip_ms",
    "error",
    "detail",
]


def failure_text(err: ServiceError) -> str:
    """A whole-request failure in the page's words: what happened, and what to change on the page's side."""
    if err.kind == "down":
        return (
            f"Cannot reach the detector API at {err.url} ({err.detail}). Start it with `aipd serve` (or `aipd demo`), "
            "or point the UI at it with AIPD_UI__API_URL / `aipd ui --api-url`."
        )
    if err.kind == "unauthorized":
        return (
            f"The API refused the API key: {err.detail} (enter the right key in the sidebar, or set "
            "AIPD_UI__API_KEY / `aipd ui --api-key`)."
        )
    if err.kind == "rate_limited":
        after = f"; retry in {err.retry_after} s" if err.retry_after else ""
        return f"The API is rate limiting this client: {err.detail}{after}."
    if err.kind == "not_ready":
        return f"The model is not ready: {err.detail}"
    return str(err)


def verdict_label(prediction: str | None) -> str:
    return VERDICT_LABELS.get(prediction or "", "Refused")


def results_table(results: list[FileResult]) -> pd.DataFrame:
    """One row per file in upload order; a refused file keeps its row, with the API's error and detail."""
    rows = [
        {
            "file": r.filename,
            "verdict": verdict_label(r.prediction),
            "probability_ai_generated": None if r.probability is None else round(r.probability, 4),
            "confidence": r.confidence,
            "threshold": r.threshold,
            "model_version": r.model_version,
            "server_latency_ms": None if r.inference_time_ms is None else round(r.inference_time_ms, 1),
            "round_trip_ms": None if r.round_trip_ms is None else round(r.round_trip_ms, 1),
            "error": r.error,
            "detail": r.detail,
        }
        for r in results
    ]
    table = pd.DataFrame(rows, columns=COLUMNS)
    text = ["file", "verdict", "confidence", "model_version", "error", "detail"]
    table[text] = table[text].astype(object).where(table[text].notna(), "")  # blank, not "None", for a refusal
    return table


def results_csv(results: list[FileResult]) -> bytes:
    return results_table(results).to_csv(index=False).encode("utf-8")


def summary_line(results: list[FileResult]) -> str:
    fakes = sum(r.prediction == "ai_generated" for r in results)
    reals = sum(r.prediction == "real" for r in results)
    refused = sum(not r.ok for r in results)
    photos = "photo" if len(results) == 1 else "photos"
    return f"{len(results)} {photos}: {fakes} AI-generated, {reals} real, {refused} refused"
