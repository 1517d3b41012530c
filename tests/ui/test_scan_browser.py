"""The catalog scan page in a real headless Chromium against the real Streamlit server: a person opens a scan's
output and sees the most suspicious photos as thumbnails. Its screenshot lands in test-output/ui-scan.png."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, ROOT, free_port
from tests.ui.test_scan_page import write_scan_output

pytestmark = pytest.mark.slow


def test_a_scan_output_renders_in_the_browser(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium); `make test` installs it")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is missing")

    from app.config import Settings
    from ui.launch import start_ui, stop_ui, wait_until_up

    top = write_scan_output(tmp_path / "scan", tmp_path / "photos")
    settings = Settings(ui={"scan_dir": str(tmp_path / "scan")})
    port = free_port()
    with (tmp_path / "streamlit.log").open("w") as log:
        process = start_ui(settings, "http://127.0.0.1:9", port, log_file=log)  # the scan page needs no API
        try:
            page_url = wait_until_up(port, process=process)
            with playwright_api.sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 1440, "height": 1800})
                    page.goto(f"{page_url}/catalog_scan")
                    thumbnails = page.locator('img[alt^="Suspicious photo"]')
                    thumbnails.nth(4).wait_for(timeout=60_000)
                    assert thumbnails.count() == 5
                    for i in range(5):  # decoded by the browser, not just present in the DOM
                        assert thumbnails.nth(i).evaluate("img => img.complete && img.naturalWidth") > 0
                    assert page.locator(f'img[alt="Suspicious photo {top[0]}"]').count() == 1
                    page.get_by_text("Could not scan").first.wait_for(timeout=10_000)
                    page.screenshot(path=str(tmp_path / "ui-scan.png"), full_page=True)
                finally:
                    browser.close()
        finally:
            stop_ui(process)
    (ROOT / "test-output").mkdir(exist_ok=True)
    shutil.copy(tmp_path / "ui-scan.png", ROOT / "test-output" / "ui-scan.png")
