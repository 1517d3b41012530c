"""`aipd scan --report`: one self-contained HTML page next to a scan's output.

What a person looks at first: how many files, how many flagged, where the probabilities fall (a histogram with the
threshold drawn on it), the most suspicious photos as thumbnails, the files that could not be scanned, and for a
labelled catalog how well the verdicts match. No external assets: the histogram is SVG, the thumbnails base64 PNGs.
"""

from __future__ import annotations

import base64
import html

from app.operating_point import format_probability
from app.scan_results import HISTOGRAM_BINS, ScanOverview, read_results, thumbnail_png
from app.storage import filesystem_of

REPORT_FILE = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 1100px; }
h1 { margin-bottom: 0.2rem; } .muted { color: #666; }
table { border-collapse: collapse; margin: 1rem 0; } td, th { padding: 0.3rem 0.8rem; border-bottom: 1px solid #ddd; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 0.8rem; }
figure { margin: 0; border: 1px solid #ddd; padding: 0.4rem; border-radius: 6px; }
figcaption { font-size: 0.8rem; word-break: break-all; } .ai { color: #b00020; font-weight: 600; }
"""


def report_path(out: str) -> str:
    return f"{out.rstrip('/')}/{REPORT_FILE}"


def write_report(out: str, top: int = 24) -> str:
    """Write the report for everything the output holds; returns where it is."""
    from app.scan_results import overview

    page = render(overview(read_results(out), top=top), out)
    target = report_path(out)
    fs, path = filesystem_of(target)
    with fs.open_output_stream(path) as stream:
        stream.write(page.encode("utf-8"))
    return target


def render(view: ScanOverview, out: str) -> str:
    verdicts = view.verdicts
    rows = [
        ("files", view.files),
        ("AI-generated", verdicts["ai_generated"]),
        ("real", verdicts["real"]),
        ("could not be scanned", verdicts["error"]),
        ("threshold", "-" if view.threshold is None else format_probability(view.threshold)),
        ("model version", ", ".join(view.model_versions) or "-"),
    ]
    rows += [
        (f"{name} (labelled files)", f"{value:.4f}" if name != "n" else int(value))
        for name, value in view.scores.items()
    ]
    if view.provenance:
        p = view.provenance
        rows.append(
            (
                "provenance",
                f"{p['c2pa_present']} with a C2PA manifest ({p['c2pa_valid']} valid, {p['c2pa_invalid']} failing); "
                f"{p['ai_declared']} declare AI generation in a valid manifest, {p['ai_hinted_unsigned']} only in "
                "unsigned metadata",
            )
        )
    if view.sources:
        rows.append(("likely generator", ", ".join(f"{name}: {n}" for name, n in view.sources.items())))
    summary = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    errors = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in view.errors.items())
    share = verdicts["ai_generated"] / max(1, verdicts["ai_generated"] + verdicts["real"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Catalog scan: {html.escape(out)}</title>
<style>{_STYLE}</style></head><body>
<h1>Catalog scan</h1>
<p class="muted">{html.escape(out)} &middot; {share:.1%} of the scanned photos flagged as AI-generated</p>
<table>{summary}</table>
<h2>Probability of AI generation</h2>
{histogram_svg(view.histogram, view.threshold)}
<h2>Most suspicious</h2>
<div class="grid">{_thumbnails(view)}</div>
<h2>Files that could not be scanned</h2>
{f"<table><tr><th>error</th><th>files</th></tr>{errors}</table>" if errors else "<p>none</p>"}
</body></html>
"""


def histogram_svg(counts: list[int], threshold: float | None, width: int = 640, height: int = 180) -> str:
    """Bars per probability bin, the threshold as a red line; an SVG string."""
    peak = max(counts) if counts and max(counts) > 0 else 1
    bar = width / HISTOGRAM_BINS
    parts = [f'<svg width="{width}" height="{height + 20}" role="img" aria-label="probability histogram">']
    for i, count in enumerate(counts):
        h = (height - 10) * count / peak
        parts.append(
            f'<rect x="{i * bar + 1:.1f}" y="{height - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" fill="#4a78b5">'
            f"<title>{i / HISTOGRAM_BINS:.2f}-{(i + 1) / HISTOGRAM_BINS:.2f}: {count}</title></rect>"
        )
    if threshold is not None:
        x = threshold * width
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height}" stroke="#b00020" stroke-width="2"/>')
    parts.append(f'<text x="0" y="{height + 15}" font-size="11">0</text>')
    parts.append(f'<text x="{width - 8}" y="{height + 15}" font-size="11">1</text></svg>')
    return "".join(parts)


def _thumbnails(view: ScanOverview) -> str:
    figures = []
    for row in view.suspicious.itertuples():
        png = thumbnail_png(str(row.path))
        image = (
            f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(str(row.path))}">'
            if png
            else "<p class='muted'>(file no longer readable)</p>"
        )
        verdict = "ai" if row.prediction == "ai_generated" else ""
        label = f"{row.probability:.3f} {html.escape(str(row.prediction))}"
        figures.append(
            f"<figure>{image}<figcaption><span class='{verdict}'>{label}</span><br>"
            f"{html.escape(str(row.path))}</figcaption></figure>"
        )
    return "".join(figures) or "<p>no scanned photo</p>"
