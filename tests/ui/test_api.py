"""The one HTTP client (app/client.py) against a real server speaking the contract: answers parsed, failures told
apart, and the page's words for them."""

from __future__ import annotations

import io
from datetime import datetime

import pytest
from PIL import Image

from app.client import ApiClient, ServiceError, api_key_of, api_url_of
from app.config import Settings
from tests.helpers import UI_KEY as KEY
from tests.helpers import free_port, photo
from tests.ui.contract_server import LOADED_AT, METRICS, MODEL_VERSION, ContractServer
from ui.results import COLUMNS, failure_text, results_csv, results_table, summary_line


def test_health_reports_model_and_metrics(contract: ContractServer) -> None:
    health = ApiClient(contract.url).health()  # /health needs no key
    assert health.ready and health.status == "healthy" and health.state == "ok"
    assert health.model_version == MODEL_VERSION and health.crop_size == 64
    assert health.metrics == pytest.approx(METRICS)
    assert health.model_loaded_at == datetime.fromisoformat(LOADED_AT) and health.registry == "reachable"


def test_health_while_loading_is_not_an_error(contract: ContractServer) -> None:
    contract.state.ready = False
    health = ApiClient(contract.url).health()
    assert not health.ready and health.status == "unhealthy" and health.state == "loading"
    assert "loading" in health.detail
    assert health.model_loaded_at is None


def test_explain_returns_verdict_and_a_decodable_heatmap(contract: ContractServer) -> None:
    result = ApiClient(contract.url, KEY).explain("bright.jpg", photo(0.9))
    assert result.ok and result.prediction == "ai_generated" and result.confidence == "high"
    assert result.model_version == MODEL_VERSION and result.threshold == 0.5
    assert result.round_trip_ms is not None and result.inference_time_ms is not None
    heatmap = Image.open(io.BytesIO(result.heatmap_png))
    assert heatmap.format == "PNG" and heatmap.size == (64, 64)


def test_a_refused_file_keeps_the_apis_own_words(contract: ContractServer) -> None:
    result = ApiClient(contract.url, KEY).explain("notes.jpg", b"just some text, not a photo")
    assert not result.ok and result.status == 400 and result.error == "not_an_image"
    assert result.detail == "the file is not an image (checked by its content, not its name)"


@pytest.mark.parametrize("key, words", [(None, "missing X-API-Key"), ("wrong", "invalid API key")])
def test_a_missing_or_wrong_key_fails_the_request_with_a_hint(contract: ContractServer, key, words) -> None:
    with pytest.raises(ServiceError) as caught:
        ApiClient(contract.url, key).explain("a.jpg", photo(0.5))
    assert caught.value.kind == "unauthorized"
    assert words in str(caught.value) and "AIPD_UI__API_KEY" in failure_text(caught.value)


def test_rate_limit_and_not_ready_are_whole_request_failures(contract: ContractServer) -> None:
    client = ApiClient(contract.url, KEY)
    contract.state.rate_limited = True
    with pytest.raises(ServiceError, match="retry in 7 s") as caught:
        client.explain("a.jpg", photo(0.5))
    assert caught.value.kind == "rate_limited"
    contract.state.rate_limited, contract.state.ready = False, False
    with pytest.raises(ServiceError, match="not ready") as caught:
        client.predict_batch([("a.jpg", photo(0.5))])
    assert caught.value.kind == "not_ready"


def test_nothing_listening_says_where_and_how_to_start_it() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for call in (lambda c: c.health(), lambda c: c.explain("a.jpg", b"x"), lambda c: c.predict_batch([("a", b"x")])):
        with pytest.raises(ServiceError) as caught:
            call(ApiClient(url, KEY))
        assert caught.value.kind == "down"
        assert url in str(caught.value) and "aipd serve" in str(caught.value)
        assert failure_text(caught.value).startswith(f"Cannot reach the detector API at {url}")


def test_a_server_that_is_not_the_detector_is_named_as_such(contract: ContractServer) -> None:
    with pytest.raises(ServiceError, match="is the API URL right") as caught:
        ApiClient(f"{contract.url}/elsewhere").health()
    assert caught.value.kind == "unexpected"


def test_batch_keeps_order_and_one_bad_file_fails_alone(contract: ContractServer) -> None:
    files = [("dark.png", photo(0.1, "PNG")), ("bad.jpg", b"GIF89a....."), ("bright.webp", photo(0.9, "WEBP"))]
    results = ApiClient(contract.url, KEY).predict_batch(files, chunk=2)
    assert [r.filename for r in results] == ["dark.png", "bad.jpg", "bright.webp"]
    assert [r.prediction for r in results] == ["real", None, "ai_generated"]
    assert results[1].error == "unsupported_type" and "GIF images are not supported" in results[1].detail
    assert all(r.heatmap_png is None for r in results)
    assert contract.state.paths.count("/predict/batch") == 2


def test_results_table_and_csv_keep_every_file(contract: ContractServer) -> None:
    client = ApiClient(contract.url, KEY)
    results = [client.explain("bright.jpg", photo(0.9)), client.explain("text.png", b"hello")]
    table = results_table(results)
    assert list(table.columns) == COLUMNS and table["verdict"].tolist() == ["AI-generated", "Refused"]
    lines = results_csv(results).decode().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == 3
    assert lines[1].startswith("bright.jpg,AI-generated,0.") and "not_an_image" in lines[2]
    assert summary_line(results) == "2 photos: 1 AI-generated, 0 real, 1 refused"


def test_api_url_and_key_come_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AIPD_API_KEYS", "AIPD_UI__API_URL", "AIPD_UI__API_KEY", "AIPD_SERVE__HOST", "AIPD_SERVE__PORT"):
        monkeypatch.delenv(name, raising=False)
    assert api_url_of(Settings()) == "http://127.0.0.1:8000"
    assert api_url_of(Settings(serve={"host": "0.0.0.0", "port": 9000})) == "http://127.0.0.1:9000"
    assert api_url_of(Settings(ui={"api_url": "http://detector:8000/"})) == "http://detector:8000"
    assert api_key_of(Settings()) is None
    assert api_key_of(Settings(api_keys=["k1", "k2"])) == "k1"
    assert api_key_of(Settings(api_keys=["k1"], ui={"api_key": "ui"})) == "ui"


def test_the_evidence_reads_as_a_moderator_needs_it() -> None:
    from app.client import FileResult
    from ui.results import evidence_lines

    declared = FileResult(
        "a.jpg",
        prediction="ai_generated",
        source_scores={"none": 0.1, "autoencoder": 0.85, "nearest_conv": 0.05},
        provenance={
            "c2pa": {"state": "valid", "claim_generator": "Firefly", "digital_source_type": "trainedAlgorithmicMedia"},
            "metadata": {"make": None, "model": None, "software": None},
            "ai_declared": True,
            "ai_hinted_unsigned": False,
        },
    )
    assert evidence_lines(declared) == [
        "**Likely source:** the autoencoder generator family (85%)",
        "**Content Credentials:** a C2PA manifest that verifies, made with Firefly",
        "**Declared AI-generated** by its signed manifest (trainedAlgorithmicMedia)",
    ]
    camera = FileResult(
        "b.jpg",
        prediction="real",
        source_scores={"none": 0.9, "autoencoder": 0.1},
        provenance={
            "c2pa": {"state": "absent"},
            "metadata": {"make": "Canon", "model": "EOS R5", "software": None},
            "ai_declared": False,
            "ai_hinted_unsigned": False,
        },
    )
    assert evidence_lines(camera) == [
        "**Likely source:** a camera (no generator) (90%)",
        "**Content Credentials:** none",
        "**Unsigned EXIF:** Canon EOS R5",
    ]
    assert evidence_lines(FileResult("c.jpg", prediction="real")) == []  # a service that reports no evidence
