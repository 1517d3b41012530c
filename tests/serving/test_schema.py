"""The API against its own OpenAPI document: schemathesis, with every check, against a real running service.

Every status and content type a route answers must be declared, schema-valid requests accepted, schema-violating
ones refused, 405s must carry `Allow` (RFC 9110), and the upload constraints (non-empty, size, number of files,
types) must be in the document. The run is bounded in examples per operation, uses a fixed seed and no example
database, so it generates the same requests every time.

What "valid" means for an upload is taught to schemathesis the documented way: the document names the accepted
types in the multipart `encoding`, and strategies registered for those media types draw real JPEG, PNG and WebP
photos. Random bytes are not a schema-valid photo, only schemathesis has no other way to know it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ServeApp, make_checkpoint, undeploy, with_serve

pytestmark = pytest.mark.slow

APP = "schema"
KEY = "schema-key"
# schemathesis builds a value over `maxLength` only up to 64 KiB; at this limit the size check is exercised for real.
MAX_BYTES = 64 * 1024
MAX_FILES = 4
SEED = 1
MAX_EXAMPLES = 50
# The refusals schemathesis expects of schema-violating requests, plus 413: how this API refuses a body over its
# limits (too large, too many files), which schemathesis's default list leaves out.
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
OPERATIONS = 26  # 13 routes, each at the root and under /v1


@pytest.fixture(scope="module")
def service(deploy, tmp_path_factory: pytest.TempPathFactory) -> ServeApp:
    from app.config import Settings
    from serving.config import AppArgs

    root = tmp_path_factory.mktemp("schema")
    settings = Settings(
        work_dir=root / "work",
        api_keys=[KEY],
        images={"max_bytes": MAX_BYTES},
        serve={
            "model_uri": str(make_checkpoint(root / "tiny-ckpt", seed=4)),
            "layout": "colocated",
            "max_batch_files": MAX_FILES,
            "rate_limit_per_minute": 0,  # a 429 would depend on timing; the run must not
            "ingress_min_replicas": 1,
            "ingress_max_replicas": 1,
        },
    )
    app = deploy(APP, with_serve(settings, champion_poll_s=0), AppArgs(autoscaling={}))
    yield app
    undeploy(APP)


def photos(fmt: str):
    """Real photos of random size and noise, in one format: what the upload routes take."""
    from hypothesis import strategies as st

    def encode(drawn: tuple[int, int, int]) -> bytes:
        width, height, seed = drawn
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt)
        return buffer.getvalue()

    return st.tuples(st.integers(1, 96), st.integers(1, 96), st.integers(0, 2**16)).map(encode)


@pytest.fixture
def photo_media_types():
    """schemathesis's registry of media-type strategies is global: filled for this test, emptied after."""
    import schemathesis
    from schemathesis.specs.openapi.media_types import unregister_all

    for media_type, fmt in (("image/jpeg", "JPEG"), ("image/png", "PNG"), ("image/webp", "WEBP")):
        schemathesis.openapi.media_type(media_type, photos(fmt))
    yield
    unregister_all()


def test_the_document_carries_this_deployments_limits(service: ServeApp) -> None:
    document = service.http.get("/openapi.json").json()
    assert len(document["paths"]) == OPERATIONS
    for path in ("/predict", "/v1/predict/explain"):
        operation = document["paths"][path]["post"]
        body = operation["requestBody"]["content"]["multipart/form-data"]
        assert body["schema"]["properties"]["file"] | {"description": ""} == {
            "type": "string",
            "format": "binary",
            "minLength": 1,
            "maxLength": MAX_BYTES,
            "description": "",
        }
        assert body["encoding"]["file"]["contentType"] == "image/jpeg, image/png, image/webp"
        assert operation["security"] == [{"ApiKeyHeader": []}]
    files = document["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert files["properties"]["files"]["minItems"] == 1 and files["properties"]["files"]["maxItems"] == MAX_FILES
    assert document["components"]["securitySchemes"]["ApiKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


@pytest.mark.timeout(300)
def test_schemathesis_finds_no_failure(
    service: ServeApp, photo_media_types, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner
    from schemathesis.cli import schemathesis as schemathesis_cli

    monkeypatch.chdir(tmp_path)  # schemathesis keeps its crash cache in ./.schemathesis
    config = tmp_path / "schemathesis.toml"
    config.write_text(f"[checks.negative_data_rejection]\nexpected-statuses = {json.dumps(REJECTIONS)}\n")
    report = tmp_path / "report.json"
    args = [
        "--config-file",
        str(config),
        "run",
        f"{service.url}/openapi.json",
        "--checks",
        "all",
        "--header",
        f"X-API-Key: {KEY}",
        "--seed",
        str(SEED),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    result = CliRunner().invoke(schemathesis_cli, args)
    assert report.exists(), result.output[-4000:]
    summary = json.loads(report.read_text())
    assert result.exit_code == 0 and not summary["failures"] and not summary["errors"], result.output[-8000:]
    assert summary["complete"] and summary["operations"]["tested"] == summary["operations"]["total"] == OPERATIONS
    assert summary["test_cases"]["generated"] >= OPERATIONS * 10, summary["test_cases"]
    uploads = {name: rates for name, rates in summary["valid_rates"].items() if name.startswith("POST /")}
    uploads = {name: rates for name, rates in uploads.items() if "/predict" in name}
    assert len(uploads) == 6
    for name, rates in uploads.items():
        assert rates["fuzzing"]["accepted"] > 0, f"{name} answered none of the generated photos"
