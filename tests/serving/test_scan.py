"""`aipd scan` on real Ray with a real registry: one row per file with the right errors, the same probabilities as the
service's `/predict`, manifests and file:// URIs, a restart that skips finished files, the HTML report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests import hostile_images as hostile
from tests.helpers import jpeg, make_checkpoint, undeploy, with_serve

pytestmark = pytest.mark.slow

FAMILIES = ["none", "autoencoder", "transposed_conv"]
# Unsigned IPTC metadata that says a generator made the photo: a hint in the scan's provenance columns.
AI_XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
    b'Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"/>'
    b"</rdf:RDF></x:xmpmeta>"
)


def _hinted_jpeg() -> bytes:
    import io

    buffer = io.BytesIO()
    hostile.noise(90, 70, seed=8).convert("RGB").save(buffer, "JPEG", xmp=AI_XMP)
    return buffer.getvalue()


VALID = {
    "shop/a.jpg": lambda: jpeg(200, 150, seed=1),
    "shop/hinted.jpg": _hinted_jpeg,
    "shop/b.jpg": lambda: jpeg(96, 96, seed=2),
    "shop/nested/c.png": lambda: hostile.encode(hostile.noise(120, 90, seed=3), "PNG"),
    "shop/nested/d.webp": lambda: hostile.encode(hostile.noise(80, 80, seed=4), "WEBP"),
    "e.jpg": lambda: jpeg(300, 200, seed=5),
    "f.jpg": lambda: jpeg(64, 64, seed=6),
}
BROKEN = {  # file -> the error row it must give
    "shop/cut.jpg": ("truncated", lambda: hostile.truncated(jpeg(200, 150, seed=7))),
    "notes.txt": ("not_an_image", lambda: hostile.TEXT),
    "shop/anim.gif": ("not_an_image", lambda: hostile.animated("GIF")),
    "empty.jpg": ("empty", lambda: b""),
}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("catalog") / "photos"
    for name, make in {**VALID, **{k: v[1] for k, v in BROKEN.items()}}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(make())
    (root / ".DS_Store").write_bytes(b"hidden files are not part of a catalog")
    return root


@pytest.fixture(scope="module")
def registered(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    """A real SQLite MLflow registry whose champion is a tiny real checkpoint."""
    import mlflow

    from app.config import Settings
    from app.registry import log_detector, set_alias, setup_mlflow

    root = tmp_path_factory.mktemp("scan-registry")
    settings = Settings(work_dir=root / "work", serve={"rate_limit_per_minute": 0})
    checkpoint = make_checkpoint(root / "ckpt", seed=11, threshold=0.5, source_families=FAMILIES)
    experiment = setup_mlflow(settings)
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    version = log_detector(settings, checkpoint, run_id=run.info.run_id, tags={}).version
    set_alias(settings, version)
    return settings, checkpoint, version


def _scan(settings, sources, out, **kwargs):
    from app.scan_results import read_results
    from serving.scan import run_scan

    summary = run_scan(settings, [str(s) for s in sources], str(out), **kwargs)
    return summary, read_results(str(out)).set_index("path")


def test_a_folder_gives_one_row_per_file_and_the_right_error_rows(registered, catalog: Path, tmp_path: Path) -> None:
    from app.scan_results import COLUMNS

    settings, _, version = registered
    summary, rows = _scan(settings, [catalog], tmp_path / "out")  # the champion, from the registry

    expected = {str(catalog / name) for name in [*VALID, *BROKEN]}
    assert set(rows.index) == expected, "every file once, hidden ones aside"
    assert list(rows.reset_index().columns) == list(COLUMNS)
    assert summary.files == len(expected) and summary.scanned == len(expected) and summary.skipped == 0
    assert summary.errors == len(BROKEN) and summary.model_version == version
    for name, (error, _) in BROKEN.items():
        row = rows.loc[str(catalog / name)]
        assert row["error"] == error and row["detail"], name
        assert pd.isna(row["probability"]) and pd.isna(row["prediction"])
    good = rows.loc[[str(catalog / name) for name in VALID]]
    assert good["error"].isna().all() and good["probability"].between(0.0, 1.0).all()
    assert set(good["prediction"]) <= {"real", "ai_generated"} and set(good["model_version"]) == {version}
    assert (good["threshold"] == 0.5).all() and good["sha256"].str.len().eq(64).all()
    a = rows.loc[str(catalog / "shop/a.jpg")]
    assert (a["width"], a["height"], a["bytes"]) == (200, 150, (catalog / "shop/a.jpg").stat().st_size)
    # the evidence beside the score: the source head's family and the file's provenance
    assert set(good["source"]) <= set(FAMILIES) and good["source_score"].between(1 / len(FAMILIES), 1.0).all()
    assert (good["c2pa"] == "absent").all() and not good["ai_declared"].any()
    hinted = good["ai_hinted_unsigned"]
    assert hinted[str(catalog / "shop/hinted.jpg")] and hinted.sum() == 1
    failed = rows.loc[[str(catalog / name) for name in BROKEN]]
    assert failed["source"].isna().all() and failed["source_score"].isna().all()


def test_the_scan_gives_the_services_probabilities(registered, catalog: Path, tmp_path: Path, deploy) -> None:
    """The scan's model actors decode (as on a GPU node: the reading tasks pass the checked bytes on); the service
    decodes in its ingress (a CPU node's layout): the same probabilities, and the same error rows."""
    from serving.config import AppArgs

    settings, checkpoint, _ = registered
    actors_decode = settings.model_copy(update={"serve": settings.serve.model_copy(update={"decode_on": "detector"})})
    _, rows = _scan(actors_decode, [catalog], tmp_path / "out", model_uri=str(checkpoint))
    for name, (error, _) in BROKEN.items():
        row = rows.loc[str(catalog / name)]
        assert row["error"] == error and pd.isna(row["probability"]) and pd.isna(row["source"]), name
    a = rows.loc[str(catalog / "shop/a.jpg")]
    assert (a["width"], a["height"]) == (200, 150)
    served = with_serve(settings, model_uri=str(checkpoint), champion_poll_s=0)
    app = deploy("scan-vs-predict", served, AppArgs(autoscaling={}))
    try:
        for name in VALID:
            path = catalog / name
            response = app.predict(path.read_bytes(), filename=path.name)
            assert response.status_code == 200, response.text
            body, row = response.json(), rows.loc[str(path)]
            assert abs(body["probability"] - row["probability"]) < 1e-4, name
            assert max(body["source_scores"], key=body["source_scores"].get) == row["source"], name
            assert abs(body["source_scores"][row["source"]] - row["source_score"]) < 1e-4, name
            assert body["provenance"]["ai_hinted_unsigned"] == row["ai_hinted_unsigned"], name
    finally:
        undeploy("scan-vs-predict")


def test_a_manifest_and_a_file_uri_are_catalogs_too(registered, catalog: Path, tmp_path: Path) -> None:
    settings, checkpoint, _ = registered
    manifest = tmp_path / "manifest.csv"
    labelled = ["shop/a.jpg", "e.jpg", "shop/cut.jpg"]
    pd.DataFrame({"path": [str(catalog / n) for n in labelled], "label": ["real", "ai_generated", "real"]}).to_csv(
        manifest, index=False
    )
    summary, rows = _scan(settings, [manifest], tmp_path / "by-manifest", model_uri=str(checkpoint))
    assert summary.files == 3 and sorted(rows["label"]) == [0, 0, 1]

    summary, rows = _scan(settings, [(catalog / "shop").as_uri()], tmp_path / "by-uri", model_uri=str(checkpoint))
    assert summary.files == 7 and all(path.startswith("file://") for path in rows.index)
    assert pd.isna(rows.loc[(catalog / "shop/a.jpg").as_uri(), "error"])


def test_a_restarted_scan_skips_what_is_done_and_rescan_redoes_it(registered, catalog: Path, tmp_path: Path) -> None:
    settings, checkpoint, _ = registered
    out = tmp_path / "out"
    first = tmp_path / "first-half.csv"
    half = sorted(VALID)[:3]
    pd.DataFrame({"path": [str(catalog / n) for n in half]}).to_csv(first, index=False)
    before, _ = _scan(settings, [first], out, model_uri=str(checkpoint))  # a scan stopped after these files
    assert before.scanned == 3

    again, rows = _scan(settings, [catalog], out, model_uri=str(checkpoint))
    assert (again.skipped, again.scanned) == (3, len(VALID) + len(BROKEN) - 3), "finished files are not redone"
    assert len(rows) == len(VALID) + len(BROKEN)
    unchanged, _ = _scan(settings, [catalog], out, model_uri=str(checkpoint))
    assert unchanged.scanned == 0, "an unchanged catalog costs a listing"
    forced, rows = _scan(settings, [catalog], out, model_uri=str(checkpoint), rescan=True)
    assert forced.scanned == len(VALID) + len(BROKEN) and len(rows) == forced.scanned


def test_the_report_shows_the_most_suspicious_photos(registered, catalog: Path, tmp_path: Path) -> None:
    from serving.scan_report import write_report

    settings, checkpoint, _ = registered
    out = tmp_path / "out"
    _, rows = _scan(settings, [catalog], out, model_uri=str(checkpoint))
    page = Path(write_report(str(out), top=3)).read_text()
    top = rows[rows["error"].isna()].sort_values("probability", ascending=False).head(3)
    for path in top.index:
        assert path in page
    assert page.count("data:image/png;base64,") == 3 and "<svg" in page
    assert "could not be scanned" in page and "truncated" in page
    assert "0 with a C2PA manifest" in page and "1 only in unsigned metadata" in page and "likely generator" in page


def test_aipd_scan_prints_the_summary(registered, catalog: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from aipd.cli import app

    settings, checkpoint, _ = registered
    out = tmp_path / "cli-out"
    result = CliRunner().invoke(
        app,
        ["scan", str(catalog / "shop"), "--out", str(out), "--model", str(checkpoint), "--report"],
        env={"AIPD_WORK_DIR": str(settings.work_dir), "COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "catalog scan" in result.output and "7 scanned now" in result.output and "report.html" in result.output
    assert (out / "report.html").is_file()
    missing = CliRunner().invoke(app, ["scan", str(tmp_path / "nowhere"), "--out", str(out)])
    assert missing.exit_code == 1 and "nothing to scan" in missing.output


def test_the_overview_scores_a_labelled_scan() -> None:
    from app.scan_results import overview

    results = pd.DataFrame(
        {
            "path": ["a", "b", "c", "d", "e"],
            "prediction": ["ai_generated", "real", "ai_generated", "real", None],
            "probability": [0.9, 0.2, 0.7, 0.6, np.nan],
            "confidence": ["high", "high", "low", "low", None],
            "threshold": [0.65] * 5,
            "model_version": ["3"] * 5,
            "error": [None, None, None, None, "corrupt"],
            "label": [1, 0, 0, 1, 1],
            "source": ["gan", "none", "gan", "none", None],
            "c2pa": ["valid", "absent", "invalid", "absent", None],
            "ai_declared": [True, False, False, False, False],
            "ai_hinted_unsigned": [False, False, True, True, False],
        }
    )
    view = overview(results, top=2)
    assert view.provenance == {
        "c2pa_present": 2,
        "c2pa_valid": 1,
        "c2pa_invalid": 1,
        "ai_declared": 1,
        "ai_hinted_unsigned": 2,
    }
    assert view.sources == {"gan": 2, "none": 2}
    assert overview(results.drop(columns=["source", "c2pa", "ai_declared", "ai_hinted_unsigned"])).provenance == {}
    assert view.verdicts == {"real": 2, "ai_generated": 2, "error": 1} and view.errors == {"corrupt": 1}
    assert sum(view.histogram) == 4 and view.threshold == 0.65
    assert list(view.suspicious["path"]) == ["a", "c"]
    assert view.scores["accuracy"] == 0.5 and view.scores["auroc"] == 0.75


def test_a_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from aipd.cli import app

    (tmp_path / "p.jpg").write_bytes(jpeg())
    result = CliRunner().invoke(
        app,
        ["scan", str(tmp_path), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-model")],
        env={"AIPD_WORK_DIR": str(tmp_path / "work")},
    )
    assert result.exit_code == 1 and "not a checkpoint directory" in result.output
    assert "Traceback" not in result.output
