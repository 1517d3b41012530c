"""The CUDA paths, run for real on the GPU machine (skipped elsewhere): a Ray Train worker trains on the GPU in bf16
and registers its model, and a Serve detector replica that holds a GPU answers the HTTP API with the probabilities
the CPU model gives for the same photos (bf16 on the GPU, float32 on the CPU: close, not equal), and so does a scan.

On the GPU machine:  python -m pytest -q -m gpu tests/gpu
(with `mlflow-skinny`, which has no SQLite store: MLFLOW_ALLOW_FILE_STORE=true AIPD_MLFLOW_TRACKING_URI=file:///tmp/m)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import CROP, jpeg, make_checkpoint, tiny_settings, undeploy, with_serve

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on the GPU machine"),
]


def test_a_ray_train_worker_trains_on_the_gpu_and_registers(ray_cluster, small_demo: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from training.trainer import run_training

    settings = tiny_settings(tmp_path, small_demo, use_gpu=True, num_workers=1, epochs=2, batch_size=16)
    outcome = run_training(settings)

    assert outcome.epochs_run == 2
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.data.params["use_gpu"] == "True"
    assert run.data.metrics["train_images_per_s"] > 0
    assert 0.0 <= outcome.report.metrics["auroc"] <= 1.0
    assert client.get_model_version(settings.registered_model, outcome.version).run_id == outcome.run_id


def test_a_gpu_detector_replica_answers_like_the_cpu_model(deploy, tmp_path: Path) -> None:
    from app.config import Settings
    from app.images import decode_image
    from app.model import AllLogits, load_checkpoint, source_probabilities
    from app.transforms import eval_preprocess, to_model_input
    from serving.config import AppArgs

    families = ["none", "autoencoder", "bilinear_conv"]  # the source head and its spectrum, in the CUDA graphs too
    checkpoint = make_checkpoint(tmp_path / "ckpt", seed=5, source_families=families)
    settings = Settings(
        work_dir=tmp_path / "work",
        serve={
            "model_uri": str(checkpoint),
            "use_gpu": True,
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.02,
            "detector_min_replicas": 1,
            "detector_max_replicas": 1,
        },
    )
    app = deploy("gpu", with_serve(settings, champion_poll_s=0), AppArgs(autoscaling={}))
    try:
        health = app.http.get("/health").json()
        assert health["device"].startswith("cuda"), health

        explained = app.predict(jpeg(seed=9), route="/predict/explain")  # Grad-CAM on the batches' worker thread
        assert explained.status_code == 200 and explained.json()["heatmap_base64"], explained.text

        photos = [jpeg(seed=seed) for seed in range(6)]
        served, served_sources = [], []
        for data in photos:
            response = app.predict(data)
            assert response.status_code == 200, response.text
            served.append(response.json()["probability"])
            served_sources.append([response.json()["source_scores"][f] for f in families])

        loaded = load_checkpoint(checkpoint, device="cpu")
        loaded.model.eval()
        crops = np.stack([eval_preprocess(decode_image(data), CROP) for data in photos])
        with torch.inference_mode():
            logits = AllLogits(loaded.model)(to_model_input(crops)).double().numpy()
        expected = 1.0 / (1.0 + np.exp(-logits[:, 0]))
        np.testing.assert_allclose(served, expected, atol=0.02)
        np.testing.assert_allclose(served_sources, source_probabilities(logits[:, 1:]), atol=0.02)

        # six photos in one request reach the detector together: a batch padded to 8 on the GPU, cut back to 6
        files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
        batch = app.http.post("/predict/batch", files=files)
        assert batch.status_code == 200, batch.text
        np.testing.assert_allclose([r["probability"] for r in batch.json()["results"]], expected, atol=0.02)
    finally:
        undeploy("gpu")


def test_a_scan_on_the_gpu_answers_like_the_cpu_model(ray_cluster, tmp_path: Path) -> None:
    """Model actors with a GPU each (CUDA graphs, bf16): the float32 CPU model's probabilities within 0.02."""
    from app.config import Settings
    from app.images import decode_image
    from app.model import load_checkpoint
    from app.scan_results import read_results
    from app.transforms import eval_preprocess, to_model_input
    from serving.scan import run_scan

    checkpoint = make_checkpoint(tmp_path / "ckpt", seed=6)
    folder = tmp_path / "catalog"
    folder.mkdir()
    photos = {folder / f"{i}.jpg": jpeg(seed=40 + i) for i in range(12)}
    for path, data in photos.items():
        path.write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"not a photo")
    settings = Settings(work_dir=tmp_path / "work", serve={"use_gpu": True})
    summary = run_scan(settings, [str(folder)], str(tmp_path / "out"), model_uri=str(checkpoint), batch_size=8)
    assert (summary.files, summary.errors) == (13, 1)
    rows = read_results(str(tmp_path / "out")).set_index("path")

    loaded = load_checkpoint(checkpoint, device="cpu")
    crops = np.stack([eval_preprocess(decode_image(data), CROP) for data in photos.values()])
    with torch.inference_mode():
        expected = torch.sigmoid(loaded.model(to_model_input(crops)).float()).reshape(-1).numpy()
    scanned = [rows.loc[str(path), "probability"] for path in photos]
    np.testing.assert_allclose(scanned, expected, atol=0.02)


def test_the_gpu_decoder_gives_the_cpu_paths_crops_and_probabilities(small_demo: Path) -> None:
    """The device decoder against the CPU decoding path on the demo test split. The stated tolerance: a model trained
    until its probabilities spread over the photos gives probabilities within 0.02 on both paths' crops (nvJPEG's
    own nearest-neighbour chroma moved them by 0.17 at the median, which `app.chroma` is there to undo); the crops
    themselves are held to 0.1 grey levels mean per photo."""
    import csv

    from app.config import ImageLimits
    from app.model import load_checkpoint
    from app.pixels import cpu_crop, decode_crops, device_decoder
    from serving.runtime import ActiveModel, score_batch

    limits = ImageLimits()
    with (small_demo / "manifest.csv").open(newline="") as fh:
        paths = [small_demo / row["path"] for row in csv.DictReader(fh) if row["split"] == "test"]
    photos = [path.read_bytes() for path in paths]
    on_gpu = decode_crops(photos, CROP, "cuda", limits)
    on_cpu = [cpu_crop(data, CROP, limits) for data in photos]
    rebuilt = sum(isinstance(crop, torch.Tensor) for crop in on_gpu)
    # the demo's saturated colours leave over half of them to the CPU (app.chroma); the rest test the rebuild
    assert rebuilt >= len(photos) // 4, f"{rebuilt} of {len(photos)} decoded on the GPU"
    # per photo and channel: where nvJPEG and libjpeg-turbo part (the IDCT rounds on every channel, the chroma
    # upsampling on the colour difference) says what to fix if the gap grows
    gaps = np.stack(
        [
            np.abs(torch.as_tensor(g).cpu().numpy().astype(float) - c).mean(axis=(0, 1))
            for g, c in zip(on_gpu, on_cpu, strict=True)
        ]
    )

    checkpoint = make_checkpoint(small_demo.parent / "gpu-pixels-ckpt", seed=4)
    cuda = torch.device("cuda")
    loaded = load_checkpoint(checkpoint, device="cuda")
    model = _trained_on_cpu_crops(loaded.model, small_demo, limits)
    active = ActiveModel(model=model, uri="", version="1", crop_size=CROP, threshold=0.5, device=cuda, bf16=False)
    on_cpu_probabilities = score_batch(active, on_cpu)[:, 0]
    probability_gap = np.abs(score_batch(active, on_gpu)[:, 0] - on_cpu_probabilities)
    per_photo, per_channel = gaps.mean(axis=1), np.round(gaps.max(axis=0), 2).tolist()
    summary = (
        f"{device_decoder('cuda')}, {rebuilt} of {len(photos)} on the GPU: mean crop gap per photo: median "
        f"{np.median(per_photo):.2f}, max "
        f"{per_photo.max():.2f} grey levels (per channel R/G/B, max: {per_channel}); probability gap: median "
        f"{np.median(probability_gap):.4f}, max {probability_gap.max():.4f}; CPU probabilities' spread (std) "
        f"{on_cpu_probabilities.std():.3f}"
    )
    print(summary)
    assert on_cpu_probabilities.std() >= 0.05, f"the model must tell the photos apart to compare paths: {summary}"
    assert gaps.mean(axis=1).max() <= 0.1 and probability_gap.max() <= 0.02, summary


def test_the_gpu_decoder_refuses_the_bad_input_corpus_as_the_cpu_path_does() -> None:
    from app.config import ImageLimits
    from app.images import ImageError
    from app.pixels import cpu_crop, decode_crops
    from tests import hostile_images as hostile

    limits = ImageLimits()
    bad = [
        hostile.TEXT,
        b"",
        hostile.truncated(jpeg(seed=9), 0.4),
        hostile.png_broken_idat(),
        hostile.jpeg_claiming(40_000, 40_000),
        hostile.SVG,
    ]
    for data, crop in zip(bad, decode_crops(bad, CROP, "cuda", limits), strict=True):
        expected = cpu_crop(data, CROP, limits)
        assert isinstance(crop, ImageError) and isinstance(expected, ImageError)
        assert crop.reason == expected.reason


def _trained_on_cpu_crops(model: torch.nn.Module, demo: Path, limits) -> torch.nn.Module:
    """The tiny model trained for a few hundred steps on the demo's training crops (CPU-decoded), so that its
    probabilities depend on the pixels: an untrained one gives every photo nearly the same, so any two decoders
    would pass."""
    import csv

    from app.pixels import cpu_crop
    from app.transforms import to_model_input

    with (demo / "manifest.csv").open(newline="") as fh:
        rows = [row for row in csv.DictReader(fh) if row["split"] == "train"]
    crops = np.stack([cpu_crop((demo / row["path"]).read_bytes(), CROP, limits) for row in rows])
    labels = torch.tensor([float(row["label"] == "ai_generated") for row in rows], device="cuda")
    x = to_model_input(crops, device="cuda")
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(300):
        batch = torch.randint(0, len(rows), (32,), device="cuda")
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[batch]).float(), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def test_the_device_decoder_leaves_work_still_queued_on_the_callers_stream_alone() -> None:
    """nvJPEG writes on a stream of its own into blocks the caching allocator just took back; without the wait in
    `app.pixels.decode_jpeg_on`, kernels still queued on the caller's stream read the decoded pixels instead of
    their own data (pytorch/vision#9606: NaN logits in a GPU-decoding training run)."""
    from torchvision.io import encode_jpeg

    from app.pixels import decode_jpeg_on

    cuda = torch.device("cuda")
    side, count = 256, 8
    photo = torch.frombuffer(
        bytearray(encode_jpeg(torch.full((3, side, side), 200, dtype=torch.uint8)).numpy()), dtype=torch.uint8
    )
    decode_jpeg_on([photo] * count, cuda)  # the decoder's buffers exist before the loop
    torch.cuda.synchronize()
    wrong = 0
    for _ in range(20):
        tensors = [torch.full((3, side, side), 7, dtype=torch.uint8, device=cuda) for _ in range(count)]
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # keeps the stream busy, so the sums below are still queued
        sums = [t.sum(dtype=torch.int64) for t in tensors]
        del tensors  # their blocks go back to the allocator while the sums still wait to read them
        decode_jpeg_on([photo] * count, cuda)
        torch.cuda.synchronize()
        wrong += sum(int(total.item()) != 7 * 3 * side * side for total in sums)
    assert wrong == 0, f"{wrong} sums read memory the decoder had written"
