"""End to end: a real Serve application (ingress + detector on a tiny checkpoint), the page against it, and a real
headless Chromium driving the real Streamlit server the way a person would: drop photos, read the verdicts.

The browser test needs Debian's `chromium` (`apt-get install -y chromium`; `make test` installs it) and the
`playwright` Python package; it never downloads a browser. Its screenshot of the page after the upload, at a laptop's
viewport, lands in the test's tmp_path and in test-output/ui-after-upload.png at the repository root.
"""

from __future__ import annotations

import io
import re
import shutil
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, ROOT, free_port, with_serve
from tests.helpers import UI_PAGE as PAGE

pytestmark = pytest.mark.slow

KEY = "e2e-key"
APP = "ui-e2e"
# The checkpoint's own evaluation numbers: /health reports them for a model served from disk.
METRICS = {"test_auroc": 0.973, "test_accuracy": 0.912, "val_auroc": 0.958}
RAY_DASHBOARD_URL = "http://127.0.0.1:8265/#/serve"
MLFLOW_URL = "http://127.0.0.1:5000/#/models/aipd-detector"
OUTPUT_DIR = ROOT / "test-output"


# Unsigned IPTC metadata that says a generator made the photo: the page shows it as a hint, never as a verdict.
AI_XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
    b'Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"/>'
    b"</rdf:RDF></x:xmpmeta>"
)
FAMILIES = ["none", "autoencoder", "bilinear_conv", "nearest_conv", "transposed_conv"]


def product_photo(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (480, 360), xmp: bytes | None = None) -> bytes:
    """A studio-style product shot: a shaded box on a soft backdrop, with sensor noise (and `xmp`, a JPEG's)."""
    rng = np.random.default_rng(seed)
    width, height = size
    backdrop = np.linspace(235, 190, height)[:, None, None] * np.ones((1, width, 3))
    image = Image.fromarray(backdrop.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(40, 200, 3))
    box = (width * 0.3, height * 0.25, width * 0.7, height * 0.8)
    draw.ellipse((box[0] - 10, box[3] - 12, box[2] + 10, box[3] + 14), fill=(150, 150, 150))
    draw.rounded_rectangle(box, radius=18, fill=colour)
    draw.rectangle((box[0] + 20, box[1] + 30, box[2] - 20, box[1] + 60), fill=(245, 245, 240))
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 4, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, fmt, **({"xmp": xmp} if xmp else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def service(deploy, tmp_path_factory: pytest.TempPathFactory):
    """(API URL, settings) of a real application at "/" that requires the API key KEY."""
    from app.config import Settings
    from serving.config import AppArgs
    from tests.helpers import make_checkpoint, undeploy

    root = tmp_path_factory.mktemp("ui-e2e")
    settings = Settings(
        work_dir=root / "work",
        api_keys=[KEY],
        serve={
            "model_uri": str(make_checkpoint(root / "tiny-ckpt", seed=2, metrics=METRICS, source_families=FAMILIES)),
            "ingress_min_replicas": 1,
            "ingress_max_replicas": 1,
            "detector_min_replicas": 1,
            "detector_max_replicas": 1,
        },
        ui={
            "ray_dashboard_url": RAY_DASHBOARD_URL,
            "mlflow_url": MLFLOW_URL,
            "grafana_url": "http://127.0.0.1:3000",
        },
    )
    app = deploy(APP, with_serve(settings, champion_poll_s=0), AppArgs(autoscaling={}))
    yield app.url, settings
    undeploy(APP)


def test_page_against_the_real_service(service, ui_env) -> None:
    from streamlit.testing.v1 import AppTest

    url, _ = service
    ui_env(url, KEY)
    page = AppTest.from_file(str(PAGE), default_timeout=120).run()
    ready = [s.value for s in page.sidebar.success]
    assert len(ready) == 1 and ready[0].startswith("Ready: model version local:")
    page.file_uploader[0].set_value(
        [
            ("shelf.jpg", product_photo(0, xmp=AI_XMP), "image/jpeg"),
            ("animated.png", b"GIF89a" + bytes(64), "image/png"),
        ]
    ).run()
    assert not page.exception, page.exception
    verdicts = [m.value for m in page.main.markdown if m.value.startswith("### ")]
    assert verdicts in (["### :red[AI-generated]"], ["### :green[Real photo]"])
    captions = [c for image in page.main.image for c in image.captions]
    assert any(c.startswith("Grad-CAM over the 64×64 center crop") for c in captions)
    assert [e.value for e in page.main.error] == [
        "Refused by the API (HTTP 415, unsupported_type): GIF images are not supported; send a JPEG, PNG or WebP"
    ]
    table = page.main.dataframe[0].value
    assert table["model_version"].tolist()[0].startswith("local:")
    evidence = [m.value for m in page.main.markdown if m.value.startswith("**Likely source:**")]
    assert len(evidence) == 1
    lines = evidence[0].split("  \n")
    assert re.fullmatch(
        r"\*\*Likely source:\*\* (a camera \(no generator\)|the \w+ generator family) \(\d+%\)", lines[0]
    )
    assert lines[1:] == [
        "**Content Credentials:** none",
        "**Hint:** unverified provenance says trainedAlgorithmicMedia; it decides nothing alone",
    ]


def test_browser_upload_shows_verdict_heatmap_and_the_serving_model(service, tmp_path: Path) -> None:
    """After an upload the page shows the verdicts, and its side panel which model answers since when, how that
    model scored, and the dashboards; its screenshot is the one the docs show."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium); `make test` installs it")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is missing")

    from ui.launch import start_ui, stop_ui, wait_until_up

    url, settings = service
    health = httpx.get(f"{url}/health", timeout=10).json()
    loaded_at = datetime.fromisoformat(health["model_loaded_at"])
    since = f"Serving version {health['model_version']} since {loaded_at:%H:%M:%S} UTC ({loaded_at:%Y-%m-%d})"
    photos = []
    for name, seed, fmt, xmp in (("red-kettle.jpg", 3, "JPEG", AI_XMP), ("desk-lamp.png", 5, "PNG", None)):
        path = tmp_path / name
        path.write_bytes(product_photo(seed, fmt, xmp=xmp))
        photos.append(path)
    refused = tmp_path / "animated.png"  # a GIF under a .png name: the uploader lets it through, the API refuses it
    refused.write_bytes(b"GIF89a" + bytes(64))

    port = free_port()
    with (tmp_path / "streamlit.log").open("w") as log:
        process = start_ui(settings, url, port, log_file=log)
        try:
            page_url = wait_until_up(port, process=process)
            with playwright_api.sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 900})
                    page.goto(page_url)
                    page.get_by_text("Ready: model version local:").wait_for(timeout=60_000)
                    page.locator('input[type="file"]').set_input_files([str(p) for p in [*photos, refused]])

                    heatmaps = page.locator('img[alt^="Grad-CAM heatmap of"]')
                    heatmaps.nth(1).wait_for(timeout=120_000)
                    assert heatmaps.count() == 2
                    for i in range(2):  # decoded by the browser, not just present in the DOM
                        assert heatmaps.nth(i).evaluate("img => img.complete && img.naturalWidth") == 64
                    verdicts = page.get_by_role("heading", name=re.compile(r"^(AI-generated|Real photo)$"))
                    assert verdicts.count() == 2 and verdicts.first.is_visible()
                    assert page.get_by_text("Probability AI-generated").count() == 2
                    assert page.get_by_text("Likely source:").count() == 2  # the evidence beside each verdict
                    assert page.get_by_text("Content Credentials:").count() == 2
                    assert page.get_by_text("unverified provenance says trainedAlgorithmicMedia").count() == 1
                    assert page.get_by_text("3 photos:").is_visible()
                    assert page.get_by_text(
                        "Refused by the API (HTTP 415, unsupported_type): GIF images are not supported"
                    ).is_visible()
                    page.get_by_text("Download results (CSV)").wait_for()

                    panel = page.get_by_test_id("stSidebar")
                    assert panel.get_by_text(since, exact=True).is_visible()
                    for name, value in METRICS.items():
                        metric = panel.get_by_test_id("stMetric").filter(has_text=name)
                        assert metric.count() == 1 and metric.get_by_test_id("stMetricValue").inner_text() == (
                            f"{value:.3f}"
                        )
                    assert panel.get_by_text("Dashboards", exact=True).is_visible()
                    for label, link in (("Ray dashboard", RAY_DASHBOARD_URL), ("MLflow", MLFLOW_URL)):
                        assert panel.get_by_role("link", name=label, exact=True).get_attribute("href") == link

                    panel.get_by_role("link").last.scroll_into_view_if_needed()  # the panel's foot, for the shot
                    page.wait_for_timeout(500)  # let the images' fade-in settle for the screenshot
                    screenshot = tmp_path / "ui-after-upload.png"
                    page.screenshot(path=str(screenshot))
                finally:
                    browser.close()
        finally:
            stop_ui(process)
    OUTPUT_DIR.mkdir(exist_ok=True)
    shutil.copy(screenshot, OUTPUT_DIR / "ui-after-upload.png")
    assert screenshot.stat().st_size > 10_000
