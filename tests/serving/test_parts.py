"""The serving parts that run without Ray: upload streaming, guards, metrics aggregation, verdicts, the config file,
and the detector's model code on a tiny real checkpoint."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from app.contract import ApiError
from tests.helpers import CROP, jpeg, make_checkpoint

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------- uploads
def _multipart(parts: list[tuple[str, str, bytes]], boundary: str = "b0undary") -> bytes:
    body = b""
    for field, filename, data in parts:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return body + f"--{boundary}--\r\n".encode()


def _read(body: bytes, chunk: int = 1000, headers: dict[str, str] | None = None, **kwargs):
    from serving.uploads import read_files

    async def stream():
        for start in range(0, len(body), chunk):
            yield body[start : start + chunk]

    head = {"content-type": "multipart/form-data; boundary=b0undary", **(headers or {})}
    options = {"field_name": "file", "max_files": 1, "max_file_bytes": 5000, "fail_fast": True, **kwargs}
    return asyncio.run(read_files(head, stream(), **options))


def test_upload_parts_are_read_across_chunk_borders() -> None:
    data = bytes(range(256)) * 10
    files = _read(_multipart([("other", "x.txt", b"ignored"), ("file", "a.jpg", data)]), chunk=7)
    assert len(files) == 1 and files[0].filename == "a.jpg" and files[0].data == data


def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    def never():
        raise AssertionError("the body must not be read")

    from serving.uploads import read_files

    async def stream():
        never()
        yield b""

    headers = {"content-type": "multipart/form-data; boundary=b0undary", "content-length": str(10**9)}
    with pytest.raises(ApiError) as err:
        asyncio.run(read_files(headers, stream(), field_name="file", max_files=1, max_file_bytes=5000, fail_fast=True))
    assert (err.value.status, err.value.error) == (413, "too_large")


def test_streaming_stops_at_the_first_byte_over_the_limit() -> None:
    from serving.uploads import read_files

    consumed = 0

    async def endless():
        nonlocal consumed
        yield b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        while True:
            consumed += 4096
            yield bytes(4096)

    headers = {"content-type": "multipart/form-data; boundary=b0undary"}
    with pytest.raises(ApiError) as err:
        asyncio.run(read_files(headers, endless(), field_name="file", max_files=1, max_file_bytes=5000, fail_fast=True))
    assert err.value.status == 413 and consumed <= 8192


def test_batch_mode_keeps_an_oversize_file_as_a_failed_entry() -> None:
    body = _multipart([("files", "big", bytes(6000)), ("files", "ok", b"fine")])
    files = _read(body, field_name="files", max_files=4, fail_fast=False)
    assert [(f.filename, f.too_large, f.data) for f in files] == [("big", True, b""), ("ok", False, b"fine")]


@pytest.mark.parametrize(
    "body, headers, status, error",
    [
        (b"{}", {"content-type": "application/json"}, 415, "unsupported_media_type"),
        (_multipart([("image", "a", b"x")]), {}, 400, "missing_file"),
        (_multipart([("file", "a", b"x")])[:-20], {}, 400, "bad_multipart"),
        (_multipart([("file", "a", b"x"), ("file", "b", b"y")]), {}, 413, "too_many_files"),
    ],
    ids=["not multipart", "no file field", "unterminated", "two files for one"],
)
def test_malformed_uploads(body: bytes, headers: dict[str, str], status: int, error: str) -> None:
    with pytest.raises(ApiError) as err:
        _read(body, headers=headers)
    assert (err.value.status, err.value.error) == (status, error)


# ----------------------------------------------------------------------------------------------------- guards
def test_api_keys() -> None:
    from serving.guards import check_api_key

    assert check_api_key([], None) is None, "no keys configured: open"
    assert check_api_key(["a", "b"], "b") == "b"
    for presented in (None, "", "c", "b "):
        with pytest.raises(ApiError) as err:
            check_api_key(["a", "b"], presented)
        assert err.value.status == 401


def test_token_bucket_allows_a_minute_of_burst_then_refills() -> None:
    from serving.guards import RateLimiter, client_identity

    now = [0.0]
    limiter = RateLimiter(per_minute=6, clock=lambda: now[0])
    alice = client_identity("alice-key", "10.0.0.1", addresses_trusted=True)
    bob = client_identity(None, "10.0.0.1", addresses_trusted=True)
    for _ in range(6):
        limiter.acquire(alice)
    with pytest.raises(ApiError) as err:
        limiter.acquire(alice)
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "10"
    limiter.acquire(bob)  # the same address without the key is another client
    now[0] = 10.0  # one token back after 60 s / 6
    limiter.acquire(alice)
    with pytest.raises(ApiError):
        limiter.acquire(alice)
    RateLimiter(per_minute=0).acquire(alice)  # 0 turns the limit off


def test_without_a_key_or_a_trustworthy_address_nobody_is_limited() -> None:
    """Behind HAProxy every request comes from HAProxy's address: counting it would make one bucket for all."""
    from serving.guards import RateLimiter, client_identity

    assert client_identity(None, "127.0.0.1", addresses_trusted=False) is None
    assert client_identity("k", "127.0.0.1", addresses_trusted=False) == "key:k"
    limiter = RateLimiter(per_minute=1)
    for _ in range(5):
        limiter.acquire(None)


# ---------------------------------------------------------------------------------------------------- metrics
def test_metrics_from_several_replicas_add_up() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from serving.metrics import MetricsState, add_counter, add_observation

    state = MetricsState()
    for replica in range(3):
        delta: dict = {}
        add_counter(delta, "predictions_total", 2, {"status": "200", "result": "real", "version": "3"})
        add_observation(delta, "prediction_batch_size", 1 + replica * 4)
        add_observation(delta, "prediction_latency_seconds", 0.02, {"route": "predict", "version": "3"})
        state.merge(delta)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(state.render().decode())
        for s in family.samples
    }
    assert samples[("predictions_total", (("result", "real"), ("status", "200"), ("version", "3")))] == 6
    assert samples[("prediction_batch_size_count", ())] == 3
    assert samples[("prediction_batch_size_sum", ())] == 1 + 5 + 9
    assert samples[("prediction_batch_size_bucket", (("le", "1.0"),))] == 1
    assert samples[("prediction_batch_size_bucket", (("le", "8.0"),))] == 2
    assert samples[("prediction_batch_size_bucket", (("le", "+Inf"),))] == 3
    with pytest.raises(ValueError, match="labels"):
        add_counter({}, "predictions_total", 1, {"status": "200"})


# --------------------------------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize(
    "p, t, verdict, confidence",
    [
        (0.99, 0.5, "ai_generated", "high"),
        (0.55, 0.5, "ai_generated", "low"),
        (0.3, 0.5, "real", "medium"),
        (0.0, 0.5, "real", "high"),
        (0.92, 0.9, "ai_generated", "low"),
        (0.97, 0.9, "ai_generated", "high"),
        (0.75, 0.9, "real", "low"),
        (0.1, 0.9, "real", "high"),
    ],
)
def test_verdict_and_confidence_follow_the_threshold(p: float, t: float, verdict: str, confidence: str) -> None:
    from app.contract import confidence_of, verdict_of

    assert (verdict_of(p, t), confidence_of(p, t)) == (verdict, confidence)


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"GIF89a....", "GIF"),
        (b"BM....", "BMP"),
        (b"  <svg xmlns=...", "SVG"),
        (b'<?xml version="1.0"?><svg>', "SVG"),
        (b"\x00\x00\x00\x18ftypheic", "HEIF/AVIF"),
        (b"hello, world", None),
        (b"%PDF-1.4", None),
        (b"", None),
    ],
)
def test_other_image_types_are_told_apart_from_non_images(data: bytes, kind: str | None) -> None:
    from serving.image_checks import other_image_type

    assert other_image_type(data) == kind


# ----------------------------------------------------------------------------------------------- config file
def test_generated_config_is_a_valid_serve_config() -> None:
    from app.config import Settings
    from serving.config import AppArgs, serve_config, validate_serve_config

    serve = {"max_batch_size": 48, "use_gpu": True, "detector_max_replicas": 4, "champion_poll_s": 3, "layout": "split"}
    settings = Settings(serve=serve)
    config = serve_config(settings, AppArgs())
    schema = validate_serve_config(config)
    app = schema.applications[0]
    assert app.import_path == "serving.app_builder:build_app" and app.route_prefix == "/"
    detector = {d["name"]: d for d in config["applications"][0]["deployments"]}["DetectorDeployment"]
    assert detector["max_ongoing_requests"] >= detector["user_config"]["max_batch_size"] == 48
    assert detector["autoscaling_config"]["max_replicas"] == 4
    assert detector["ray_actor_options"]["num_gpus"] == 1
    assert detector["user_config"]["champion_poll_s"] == 3
    assert "api_keys" not in config["applications"][0]["args"]["settings"], "no secrets in the file"


def test_a_gpu_decodes_in_the_detector_and_a_cpu_node_in_the_ingress() -> None:
    from app.config import Settings
    from serving.config import AppArgs, serve_config

    def written(config: dict) -> tuple[str, str, list[str]]:
        app = config["applications"][0]
        serve = app["args"]["settings"]["serve"]
        return serve["layout"], serve["decode_on"], [d["name"] for d in app["deployments"]]

    on_gpu = written(serve_config(Settings(), AppArgs(), num_gpus=0.125))
    # the cores decode: the GPU's decode (the same pixels, app.chroma) measured slower with replicas sharing a card
    assert on_gpu == ("colocated", "ingress", ["IngressDeployment"]), "replicas sharing a card, no hop"
    split = Settings(serve={"layout": "split"})
    assert written(serve_config(split, AppArgs(), num_gpus=1.0)) == (
        "split",
        "ingress",
        ["IngressDeployment", "DetectorDeployment"],
    )
    on_device = Settings(serve={"decode_on": "detector"})
    assert written(serve_config(on_device, AppArgs(), num_gpus=1.0))[1] == "detector", "the GPU decoder, when asked"
    assert written(serve_config(Settings(), AppArgs(), num_gpus=0.0)) == ("colocated", "ingress", ["IngressDeployment"])
    assert written(serve_config(Settings(), AppArgs()))[:2] == ("split", "auto"), "left to the builder on the cluster"
    pinned = Settings(serve={"decode_on": "ingress"})
    assert written(serve_config(pinned, AppArgs(), num_gpus=1.0))[1] == "ingress", "a choice made is kept"

    shared = Settings(serve={"use_gpu": True, "gpus_per_replica": 0.25, "layout": "colocated"})
    (one,) = serve_config(shared, AppArgs())["applications"][0]["deployments"]
    assert one["ray_actor_options"]["num_gpus"] == 0.25, "colocated replicas share a card"


def test_a_gpu_cluster_sizes_what_was_left_at_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import Settings
    from serving.config import GPU_MAX_BATCH_SIZE, sized_for_node

    # colocated, the default layout: a replica per two cores, sharing the cards evenly, a fixed count
    sized = sized_for_node(Settings(), cpus=16, gpus=1).serve
    assert (sized.detector_min_replicas, sized.detector_max_replicas, sized.gpus_per_replica) == (8, 8, 0.125)
    assert sized.max_batch_size == GPU_MAX_BATCH_SIZE
    four = sized_for_node(Settings(), cpus=64, gpus=4).serve
    assert (four.detector_max_replicas, four.gpus_per_replica) == (32, 0.125)
    halves = sized_for_node(Settings(serve={"gpus_per_replica": 0.5}), cpus=64, gpus=4).serve
    assert (halves.detector_min_replicas, halves.detector_max_replicas, halves.gpus_per_replica) == (8, 8, 0.5)
    assert sized_for_node(Settings(), cpus=16, gpus=0) == Settings(), "a CPU cluster keeps the defaults"

    # split: ingress replicas for the cores, a model replica per GPU (or per share)
    split = sized_for_node(Settings(serve={"layout": "split"}), cpus=16, gpus=1).serve
    assert (split.ingress_min_replicas, split.ingress_max_replicas) == (8, 8)
    assert split.max_batch_size == GPU_MAX_BATCH_SIZE and split.detector_max_replicas == 1
    shared = sized_for_node(Settings(serve={"layout": "split", "gpus_per_replica": 0.5}), cpus=64, gpus=4).serve
    assert shared.detector_max_replicas == 8 and shared.ingress_max_replicas == 32

    chosen_settings = Settings(serve={"layout": "split", "max_batch_size": 16, "ingress_max_replicas": 3})
    chosen = sized_for_node(chosen_settings, cpus=16, gpus=1).serve
    assert (chosen.max_batch_size, chosen.ingress_max_replicas, chosen.ingress_min_replicas) == (16, 3, 3)
    monkeypatch.setenv("AIPD_SERVE__MAX_BATCH_SIZE", "24")
    assert sized_for_node(Settings(), cpus=16, gpus=1).serve.max_batch_size == 24, "the environment's value is kept"


def test_the_repository_config_is_what_aipd_serve_writes_from_the_defaults(tmp_path: Path) -> None:
    from app.config import Settings
    from serving.config import serve_config, validate_serve_config, write_serve_config

    committed = REPO / "serving" / "serve_config.yaml"
    validate_serve_config(yaml.safe_load(committed.read_text()))
    fresh = write_serve_config(tmp_path / "serve_config.yaml", serve_config(Settings()))
    assert fresh.read_text() == committed.read_text(), (
        "serving/serve_config.yaml is stale: regenerate it with "
        "`aipd serve --write-config serving/serve_config.yaml --dry-run`"
    )


def test_the_builder_accepts_the_config_file_args() -> None:
    from ray.serve import Application

    from serving.app_builder import build_app

    args = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())["applications"][0]["args"]
    assert isinstance(build_app(args), Application)


def _native_bf16() -> bool:
    from serving.runtime import cpu_has_native_bf16

    return cpu_has_native_bf16()


# ------------------------------------------------------------------------------------------- detector model code
@pytest.fixture(scope="module")
def active(tmp_path_factory: pytest.TempPathFactory):
    from app.config import Settings
    from serving.runtime import load_active, pick_device

    checkpoint = make_checkpoint(tmp_path_factory.mktemp("parts") / "checkpoint", seed=4, threshold=0.7)
    return load_active(Settings(), str(checkpoint), pick_device(False), warmup_sizes=(1, 4), precision="fp32")


def test_a_batch_gives_the_same_answers_as_one_by_one(active) -> None:
    from serving.runtime import run_batch

    crops = [np.random.default_rng(i).integers(0, 256, (CROP, CROP, 3), dtype=np.uint8) for i in range(5)]
    together = run_batch(active, crops)
    alone = np.concatenate([run_batch(active, [crop]) for crop in crops])
    assert together.shape == (5,) and np.allclose(together, alone, atol=1e-5)
    assert active.threshold == 0.7 and active.crop_size == CROP and active.version.startswith("local:")


def test_gpu_batches_are_padded_to_a_few_sizes_that_are_all_warmed_up() -> None:
    from serving.runtime import gpu_batch_buckets, padded_batch_size

    assert gpu_batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert gpu_batch_buckets(48)[-1] == 64 and gpu_batch_buckets(1) == (1,)
    for n in range(1, 65):
        assert n <= padded_batch_size(n, "cuda") < 2 * n and padded_batch_size(n, "cuda") in gpu_batch_buckets(n)
    assert padded_batch_size(5, "cpu") == 5, "on a CPU padding would only cost"
    assert padded_batch_size(5, "cuda", captured=(256,)) == 256, "a scan captures one size; smaller batches pad to it"
    assert padded_batch_size(300, "cuda", captured=(256,)) == 512, "beyond the graphs: the next power of two, eager"


def test_the_cpu_runs_a_frozen_trace_with_the_eager_models_answers(active) -> None:
    import torch

    assert isinstance(active.infer, torch.jit.ScriptModule), "float32 on a CPU serves through the frozen trace"
    x = torch.rand(3, 3, CROP, CROP).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.allclose(active.infer(x)[:, 0], active.model(x), atol=1e-5)


def test_the_source_head_scores_every_family_in_the_same_forward_pass(tmp_path: Path) -> None:
    import torch

    from app.config import Settings
    from app.model import AllLogits
    from app.transforms import to_model_input
    from serving.runtime import load_active, pick_device, run_batch, score_batch, source_scores

    families = ["none", "autoencoder", "transposed_conv"]
    checkpoint = make_checkpoint(tmp_path / "checkpoint", seed=6, source_families=families)
    traced = load_active(Settings(), str(checkpoint), pick_device(False), warmup_sizes=(1, 3), precision="fp32")
    crops = [np.random.default_rng(i).integers(0, 256, (CROP, CROP, 3), dtype=np.uint8) for i in range(3)]

    rows = score_batch(traced, crops)
    assert rows.shape == (3, 1 + len(families)) and np.allclose(rows[:, 1:].sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(rows[:, 0], run_batch(traced, crops))
    x = to_model_input(np.stack(crops))
    with torch.inference_mode():
        eager = AllLogits(traced.model)(x)
    assert np.allclose(rows[:, 0], torch.sigmoid(eager[:, 0]).numpy(), atol=1e-5)
    assert np.allclose(rows[:, 1:], torch.softmax(eager[:, 1:], dim=1).numpy(), atol=1e-5)
    scores = source_scores(traced, rows[0])
    assert list(scores) == families and sum(scores.values()) == pytest.approx(1.0, abs=1e-4)


def test_a_model_without_the_source_head_answers_no_source_scores(active) -> None:
    from serving.runtime import score_batch, source_scores

    rows = score_batch(active, [np.zeros((CROP, CROP, 3), np.uint8)])
    assert rows.shape == (1, 1) and source_scores(active, rows[0]) is None


@pytest.mark.skipif(not _native_bf16(), reason="this CPU has no bf16 instructions (AVX512-BF16, AMX)")
def test_bf16_on_a_cpu_that_has_it_is_close_to_float32_and_the_same_at_every_batch_size(tmp_path: Path) -> None:
    from app.config import Settings
    from serving.runtime import load_active, pick_device, run_batch

    checkpoint = make_checkpoint(tmp_path / "checkpoint", seed=5)
    fp32 = load_active(Settings(), str(checkpoint), pick_device(False), warmup_sizes=(1, 6), precision="fp32")
    bf16 = load_active(Settings(), str(checkpoint), pick_device(False), warmup_sizes=(1, 6))  # auto
    assert bf16.bf16 and bf16.infer_dtype is not None and str(bf16.infer_dtype) == "torch.bfloat16"
    crops = [np.random.default_rng(i).integers(0, 256, (CROP, CROP, 3), dtype=np.uint8) for i in range(6)]
    together = run_batch(bf16, crops)
    alone = np.concatenate([run_batch(bf16, [crop]) for crop in crops])
    assert np.array_equal(together, alone), "the scan (large batches) and the service (small ones) agree exactly"
    assert np.abs(together - run_batch(fp32, crops)).max() < 2e-3


def test_a_crop_of_another_size_is_recropped(active) -> None:
    from serving.runtime import fit_crop

    assert fit_crop(np.zeros((CROP * 2, CROP * 3, 3), np.uint8), CROP).shape == (CROP, CROP, 3)
    small = fit_crop(np.zeros((10, 20, 3), np.uint8), CROP)
    assert small.shape == (CROP, CROP, 3) and small.dtype == np.uint8


def test_gradcam_gives_a_heatmap_png_and_the_same_probability(active) -> None:
    from serving.runtime import explain_crop, run_batch

    crop = np.asarray(Image.open(io.BytesIO(jpeg(CROP, CROP, seed=2))).convert("RGB"))
    crop.setflags(write=False)  # as it arrives from Ray's object store
    result = explain_crop(active, crop)
    assert result.probability == pytest.approx(float(run_batch(active, [crop])[0]), abs=1e-4)
    heatmap = Image.open(io.BytesIO(result.heatmap_png))
    assert heatmap.format == "PNG" and heatmap.size == (CROP, CROP)
