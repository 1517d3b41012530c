"""The Streamlit page: drop product photos, get verdicts and their Grad-CAM evidence from the detector's HTTP API.

`aipd ui` (ui/launch.py) starts it and hands over the API URL, key and dashboard links as AIPD_UI__* variables, so
`streamlit run ui/streamlit_app.py` with the same variables works too. Streamlit reruns this script on every click,
so answers are kept in the session, keyed by the file's bytes and the API asked: a rerun (a download, a toggle)
never sends a photo twice, and a photo the API could not answer (down, wrong key) is sent again on the next run.
"""

from __future__ import annotations

import hashlib

import streamlit as st

from app.client import ApiClient, FileResult, Health, ServiceError, api_key_of, api_url_of
from app.config import Settings, load_settings
from app.contract import API_KEY_HEADER
from ui.results import evidence_lines, failure_text, results_csv, results_table, summary_line, verdict_label

ACCEPTED_TYPES = ["jpg", "jpeg", "png", "webp"]
ANSWERS = "aipd_answers"


def show_failure(err: ServiceError) -> None:
    text = failure_text(err)
    if err.kind in ("rate_limited", "not_ready"):
        st.warning(text, icon=":material/hourglass_top:")
    elif err.kind == "unauthorized":
        st.error(text, icon=":material/key_off:")
    else:
        st.error(text, icon=":material/cloud_off:")


def serving_since(health: Health) -> str | None:
    """Which model answers, and since when: a switch of champion shows as a new version and a new time. In UTC,
    since the page's server and its reader may be in different time zones."""
    if not health.ready or health.model_loaded_at is None:
        return None
    at = health.model_loaded_at
    return f"Serving version `{health.model_version}` since **{at:%H:%M:%S} UTC** ({at:%Y-%m-%d})"


def show_health(client: ApiClient) -> Health | None:
    try:
        health = client.health()
    except ServiceError as err:
        show_failure(err)
        return None
    if health.ready:
        st.success(f"Ready: model version {health.model_version}", icon=":material/check_circle:")
        if health.registry == "unreachable":
            st.warning(health.detail or "The model registry is unreachable.", icon=":material/cloud_off:")
    else:
        st.warning(f"Model {health.state}: {health.detail or 'no detail'}", icon=":material/hourglass_top:")
    facts = [
        ("Model version", health.model_version),
        ("Model URI", health.model_uri),
        ("Threshold", None if health.threshold is None else f"{health.threshold:.3f}"),
        ("Input crop", None if health.crop_size is None else f"{health.crop_size}×{health.crop_size} px"),
        ("Device", health.device),
    ]
    st.markdown("  \n".join(f"**{name}:** `{value}`" for name, value in facts if value is not None))
    since = serving_since(health)
    if since:
        st.markdown(since)
    st.subheader("Evaluation metrics")
    if health.metrics:
        columns = st.columns(2)
        for i, (name, value) in enumerate(sorted(health.metrics.items())):
            columns[i % 2].metric(name, f"{value:.3f}")
    else:
        st.caption("The API reports no evaluation metrics for this model.")
    return health


def show_links(settings: Settings) -> None:
    links = [
        ("Ray dashboard", settings.ui.ray_dashboard_url),
        ("MLflow", settings.ui.mlflow_url),
        ("Grafana", settings.ui.grafana_url),
    ]
    configured = [(label, url) for label, url in links if url]
    st.subheader("Dashboards")
    if not configured:
        st.caption("Set AIPD_UI__RAY_DASHBOARD_URL, AIPD_UI__MLFLOW_URL or AIPD_UI__GRAFANA_URL to link them here.")
    for label, url in configured:
        st.link_button(label, url, width="stretch")


def sidebar(settings: Settings) -> tuple[ApiClient, bool]:
    with st.sidebar:
        st.header("Service")
        url = api_url_of(settings)
        st.caption(f"API: {url}")
        key = st.text_input(
            f"API key ({API_KEY_HEADER})",
            value=api_key_of(settings) or "",
            type="password",
            help="Sent with every prediction; leave empty when the service has no keys.",
        )
        client = ApiClient(url, key.strip() or None)
        show_health(client)
        explain = st.toggle(
            "Grad-CAM heatmaps",
            value=True,
            help="Off: verdicts only, several photos per request (/predict/batch); faster for many photos.",
        )
        show_links(settings)
    return client, explain


def answer_key(client: ApiClient, explain: bool, name: str, data: bytes) -> str:
    digest = hashlib.sha256()
    for part in (client.base_url, client.api_key or "", "explain" if explain else "batch", name):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(data)
    return digest.hexdigest()


def analyse(client: ApiClient, files: list[tuple[str, bytes]], explain: bool, chunk: int) -> list[FileResult | None]:
    """Answers in upload order; None where the service failed before answering (the failure is shown)."""
    answers: dict[str, FileResult] = st.session_state.setdefault(ANSWERS, {})
    keys = [answer_key(client, explain, name, data) for name, data in files]
    missing = [(key, name, data) for key, (name, data) in zip(keys, files, strict=True) if key not in answers]
    if missing:
        bar = st.progress(0.0, text=f"Sending {len(missing)} photo(s) to the detector...")
        try:
            if explain:
                for done, (key, name, data) in enumerate(missing, start=1):
                    answers[key] = client.explain(name, data)
                    bar.progress(done / len(missing), text=f"Explained {done} of {len(missing)}")
            else:
                results = client.predict_batch([(name, data) for _, name, data in missing], chunk=chunk)
                for (key, _, _), result in zip(missing, results, strict=False):
                    answers[key] = result
        except ServiceError as err:
            show_failure(err)
        finally:
            bar.empty()
    return [answers.get(key) for key in keys]


def show_card(result: FileResult, data: bytes) -> None:
    with st.container(border=True):
        st.markdown(f"#### {result.filename}")
        if not result.ok:
            status = f"HTTP {result.status}, " if result.status else ""
            st.error(f"Refused by the API ({status}{result.error}): {result.detail}", icon=":material/block:")
            return
        photo, heatmap, facts = st.columns([1, 1, 1.4])
        photo.image(data, caption="Uploaded photo", width="stretch", alt=f"Uploaded photo {result.filename}")
        if result.heatmap_png:
            crop = f"{result.crop_size}×{result.crop_size} " if result.crop_size else ""
            heatmap.image(
                result.heatmap_png,
                caption=f"Grad-CAM over the {crop}center crop the model saw (red: most evidence)",
                width="stretch",
                alt=f"Grad-CAM heatmap of {result.filename}",
            )
        else:
            heatmap.caption("Grad-CAM heatmaps are off (sidebar).")
        with facts:
            colour = "red" if result.prediction == "ai_generated" else "green"
            st.markdown(f"### :{colour}[{verdict_label(result.prediction)}]")
            probability = result.probability or 0.0
            threshold = f" (threshold {result.threshold:.0%})" if result.threshold is not None else ""
            st.progress(min(max(probability, 0.0), 1.0), text=f"Probability AI-generated: {probability:.1%}{threshold}")
            lines = [f"**Confidence:** {result.confidence}", f"**Model version:** `{result.model_version}`"]
            latency = f"**Latency:** {result.inference_time_ms or 0:.0f} ms on the server"
            if result.round_trip_ms is not None:
                latency += f", {result.round_trip_ms:.0f} ms round trip"
            st.markdown("  \n".join([*lines, latency]))
            evidence = evidence_lines(result)
            if evidence:
                st.markdown("##### Evidence")
                st.markdown("  \n".join(evidence))


def main() -> None:
    st.set_page_config(page_title="AI Product Photo Detector", page_icon=":material/image_search:", layout="wide")
    try:
        settings = load_settings()
    except Exception as err:  # noqa: BLE001 - a bad AIPD_* value must be shown on the page, not as a traceback
        st.error(f"The UI settings are invalid: {err}")
        st.stop()
    client, explain = sidebar(settings)

    st.title("AI Product Photo Detector")
    st.caption(
        "Is a product photo a real photograph or AI-generated? Drop photos below; each gets a verdict, "
        "its probability and a heatmap of where the model found its evidence."
    )
    uploads = st.file_uploader(
        "Product photos (JPEG, PNG or WebP)",
        type=ACCEPTED_TYPES,
        accept_multiple_files=True,
        help="Drag and drop one or many photos; the API checks each file's content, not its name.",
    )
    if not uploads:
        st.info("Drop one or more product photos above to check them.")
        return
    files = [(upload.name, upload.getvalue()) for upload in uploads]
    answers = analyse(client, files, explain, chunk=settings.serve.max_batch_files)
    answered = [(result, data) for result, (_, data) in zip(answers, files, strict=True) if result is not None]
    if not answered:
        return
    results = [result for result, _ in answered]
    st.subheader(summary_line(results))
    st.dataframe(
        results_table(results),
        hide_index=True,
        column_config={
            "probability_ai_generated": st.column_config.ProgressColumn(
                "P(AI-generated)", min_value=0.0, max_value=1.0, format="%.3f"
            ),
        },
    )
    st.download_button(
        "Download results (CSV)",
        results_csv(results),
        file_name="aipd-results.csv",
        mime="text/csv",
        on_click="ignore",
    )
    for result, data in answered:
        show_card(result, data)


main()
