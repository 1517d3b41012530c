"""The catalog scan page: open an `aipd scan` output and see what it found.

It reads the scan's Parquet output (a folder or any URI pyarrow reads), not the HTTP API: a scan is a batch job whose
result outlives any service. The numbers and the most suspicious photos come from `app.scan_results`, the same as the
report that `aipd scan --report` writes.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.config import load_settings
from app.scan_results import HISTOGRAM_BINS, overview, read_results, thumbnail_png

TOP = 12


def main() -> None:
    st.set_page_config(page_title="Catalog scan", page_icon=":material/inventory_2:", layout="wide")
    st.title("Catalog scan")
    default = st.query_params.get("out") or load_settings().ui.scan_dir or ""
    out = st.text_input(
        "Scan output (folder or URI)",
        value=default,
        help="The --out of `aipd scan`: its Parquet files, one row per photo.",
    ).strip()
    if not out:
        st.info("Scan a catalog with `aipd scan photos/ --out scans/photos`, then open its output here.")
        return
    results = read_results(out)
    if results.empty:
        st.warning(f"No scan output at {out}: no readable Parquet files there.")
        return
    view = overview(results, top=TOP)
    scanned = view.verdicts["ai_generated"] + view.verdicts["real"]
    share = view.verdicts["ai_generated"] / scanned if scanned else 0.0
    columns = st.columns(5)
    columns[0].metric("Photos", f"{view.files:,}")
    columns[1].metric(
        "AI-generated", f"{view.verdicts['ai_generated']:,}", f"{share:.1%} of those scanned", delta_color="off"
    )
    columns[2].metric("Real", f"{view.verdicts['real']:,}")
    columns[3].metric("Could not scan", f"{view.verdicts['error']:,}")
    columns[4].metric("Threshold", "-" if view.threshold is None else f"{view.threshold:.3f}")
    if view.scores:
        st.caption(
            f"On the {int(view.scores['n'])} labelled photos: AUROC {view.scores['auroc']:.3f}, "
            f"accuracy {view.scores['accuracy']:.1%}"
        )
    st.caption(f"Model version {', '.join(view.model_versions) or '-'}")
    if view.provenance:
        p = view.provenance
        st.caption(
            f"Provenance: {p['c2pa_present']:,} with a C2PA manifest ({p['c2pa_valid']:,} valid, "
            f"{p['c2pa_invalid']:,} failing); {p['ai_declared']:,} declare AI generation in a valid manifest, "
            f"{p['ai_hinted_unsigned']:,} only in unsigned metadata"
        )
    if view.sources:
        st.caption("Likely generator: " + ", ".join(f"{name} {n:,}" for name, n in view.sources.items()))

    st.subheader("Probability of AI generation")
    edges = [f"{i / HISTOGRAM_BINS:.2f}" for i in range(HISTOGRAM_BINS)]
    st.bar_chart(pd.DataFrame({"photos": view.histogram}, index=pd.Index(edges, name="probability from")))

    st.subheader("Most suspicious")
    grid = st.columns(4)
    for i, row in enumerate(view.suspicious.itertuples()):
        with grid[i % 4]:
            png = thumbnail_png(str(row.path))
            caption = f"{row.probability:.3f} {row.prediction} · {row.path}"
            if png is None:
                st.caption(f"(no longer readable) {caption}")
            else:
                st.image(png, caption=caption, alt=f"Suspicious photo {row.path}")

    if view.errors:
        st.subheader("Could not scan")
        st.dataframe(results[results["error"].notna()][["path", "error", "detail"]], hide_index=True)


main()
