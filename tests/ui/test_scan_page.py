"""The catalog scan page on a scan's real Parquet output: counts, the histogram, the most suspicious photos as
thumbnails, the files that could not be scanned, and what it says when there is nothing to show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.scan_results import COLUMNS
from tests.helpers import ROOT, jpeg

SCAN_PAGE = ROOT / "ui" / "pages" / "catalog_scan.py"


def write_scan_output(folder: Path, photos: Path) -> list[str]:
    """A scan's output as `aipd scan` writes it: Parquet rows in the scan's columns, one of them an error row."""
    photos.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, probability in enumerate([0.95, 0.2, 0.81, 0.4, 0.99]):
        path = photos / f"item-{i}.jpg"
        path.write_bytes(jpeg(160, 120, seed=i))
        verdict = "ai_generated" if probability >= 0.8 else "real"
        hinted = i == 1  # its unsigned metadata says a generator made it
        rows.append(
            [str(path), verdict, probability, "high", 0.8, "7", 160, 120, 1000, "ab" * 32, None, None, -1]
            + ["none" if i % 2 else "autoencoder", 0.7, "valid" if i == 0 else "absent", i == 0, hinted]
        )
    rows.append(
        [
            str(photos / "notes.txt"),
            None,
            np.nan,
            None,
            0.8,
            "7",
            None,
            None,
            42,
            "cd" * 32,
            "not_an_image",
            "not a JPEG, PNG or WebP image",
            -1,
            None,
            None,
            "absent",
            False,
            False,
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(COLUMNS)).to_parquet(folder / "part-0.parquet")
    return [str(photos / f"item-{i}.jpg") for i in (4, 0, 2)]  # the most suspicious first


def test_the_page_shows_a_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    top = write_scan_output(tmp_path / "scan", tmp_path / "photos")
    monkeypatch.setenv("AIPD_UI__SCAN_DIR", str(tmp_path / "scan"))
    page = AppTest.from_file(str(SCAN_PAGE), default_timeout=60).run()
    assert not page.exception, page.exception
    metrics = {m.label: m.value for m in page.metric}
    assert metrics["Photos"] == "6" and metrics["AI-generated"] == "3" and metrics["Could not scan"] == "1"
    assert metrics["Threshold"] == "0.800"
    captions = [c for image in page.image for c in image.captions]  # a grid: listed column by column
    ranked = sorted(captions, key=lambda c: -float(c.split()[0]))
    assert [c.split(" · ")[1] for c in ranked][:3] == top, "the most suspicious photos, every one shown"
    assert len(captions) == 5 and ranked[0].startswith("0.990 ai_generated")
    errors = page.dataframe[0].value
    assert errors["error"].tolist() == ["not_an_image"]
    texts = [c.value for c in page.caption]
    assert (
        "Provenance: 1 with a C2PA manifest (1 valid, 0 failing); 1 declare AI generation in a valid manifest, "
        "1 only in unsigned metadata"
    ) in texts
    assert "Likely generator: autoencoder 3, none 2" in texts


def test_the_page_says_what_to_do_without_a_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv("AIPD_UI__SCAN_DIR", raising=False)
    page = AppTest.from_file(str(SCAN_PAGE), default_timeout=60).run()
    assert "aipd scan" in page.info[0].value
    page.text_input[0].set_value(str(tmp_path / "nothing-here")).run()
    assert "No scan output" in page.warning[0].value
