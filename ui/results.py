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


C2PA_WORDS = {
    "valid": "a C2PA manifest that verifies",
    "invalid": "a C2PA manifest that fails verification (the file was changed after signing)",
    "unreadable": "a C2PA manifest that cannot be read",
    "remote": "a reference to a C2PA manifest elsewhere (not fetched)",
    "too_large": "a file too large to verify its C2PA manifest",
    "timeout": "a C2PA manifest whose check took too long",
}


def evidence_lines(result: FileResult) -> list[str]:
    """The evidence beside the score, in a moderator's words: the likely generator family, and what the file's
    provenance says (a valid manifest's declaration, or unsigned metadata that only hints)."""
    lines = []
    if result.source_scores:
        family, score = max(result.source_scores.items(), key=lambda item: item[1])
        name = "a camera (no generator)" if family == "none" else f"the {family} generator family"
        lines.append(f"**Likely source:** {name} ({score:.0%})")
    if result.provenance is None:  # a service that does not read provenance
        return lines
    provenance = result.provenance
    c2pa = provenance.get("c2pa") or {}
    metadata = provenance.get("metadata") or {}
    if c2pa.get("state") in C2PA_WORDS:
        made_by = f", made with {c2pa['claim_generator']}" if c2pa.get("claim_generator") else ""
        lines.append(f"**Content Credentials:** {C2PA_WORDS[c2pa['state']]}{made_by}")
    else:
        lines.append("**Content Credentials:** none")
    if provenance.get("ai_declared"):
        lines.append(f"**Declared AI-generated** by its signed manifest ({c2pa.get('digital_source_type')})")
    elif provenance.get("ai_hinted_unsigned"):
        source = metadata.get("digital_source_type") or c2pa.get("digital_source_type")
        lines.append(f"**Hint:** unverified provenance says {source}; it decides nothing alone")
    camera = " ".join(v for v in (metadata.get("make"), metadata.get("model")) if v)
    if camera or metadata.get("software"):
        made = ", ".join(v for v in (camera, metadata.get("software")) if v)
        lines.append(f"**Unsigned EXIF:** {made}")
    return lines


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
