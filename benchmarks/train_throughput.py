"""Training throughput, images per second per GPU at 224 px in bf16, three ways side by side in one run.

Why each measurement:
  (a) model-only ceiling: synthetic uint8 batches already on the GPU, the same step (to_model_input, forward,
      backward, AdamW). No input pipeline can beat it; (c)/(a) says how much of the GPU the pipeline leaves idle.
  (b) plain PyTorch DataLoader: as many worker processes as cores, each reading files and running the project's
      decode + augmentation (``app.images``, ``app.transforms``). The baseline most projects ship.
  (c) this project's pipeline: Ray Data reads, decodes and augments in ``map_batches`` and streams into a Ray Train
      worker (``training.trainer.build_trainer``, the code ``aipd train`` runs). Steady-state rows/s (after the first
      batch of an epoch) is taken from the last epoch; the whole-epoch rate and the time to the first batch (Ray Data
      re-executes the pipeline every epoch) are reported beside it. Here Ray Data's tasks decode and augment with
      Pillow (`train.decode_on: tasks`).
  (d) the same with the workers decoding their batches on the GPU (nvJPEG) and augmenting there, the tasks only
      reading and checking (`train.decode_on: workers`, the GPU default), the next epoch started during validation.

Data: ``--files`` JPEG files (default 20,000) of ``--side`` px (default 256) on local disk, written once into
``--data-dir``. Usage (GPU machine):  python benchmarks/train_throughput.py --files 20000 --gpus 1
A CPU smoke run:  python benchmarks/train_throughput.py --files 256 --batch 16 --steps 4 --device cpu --crop 64
The CPU model-only figure (the 2-core machine's training ceiling at the CPU defaults):
                  python benchmarks/train_throughput.py --device cpu --only a --crop 112 --batch 64 --steps 8 [--nchw]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: this checkout's packages


def _write_chunk(args: tuple[str, int, int, int]) -> int:
    from PIL import Image, ImageFilter

    folder, start, count, side = args
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        label = "real" if i % 2 == 0 else "ai_generated"
        base = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((side, side), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 4 if label == "real" else 1, (side, side, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels).filter(
            ImageFilter.SMOOTH_MORE if label == "ai_generated" else ImageFilter.DETAIL
        )
        split = "val" if i % 50 < 2 else "train"
        path = Path(folder) / split / label / f"{i:06d}.jpg"
        image.save(path, "JPEG", quality=int(rng.integers(80, 96)))
    return count


def make_files(folder: Path, files: int, side: int) -> None:
    marker = folder / f".done-{files}-{side}"
    if marker.exists():
        return
    for split in ("train", "val", "test"):
        for label in ("real", "ai_generated"):
            (folder / split / label).mkdir(parents=True, exist_ok=True)
    chunk = 500
    jobs = [(str(folder), s, min(chunk, files - s), side) for s in range(0, files, chunk)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_chunk, jobs))
    # a tiny test split so the index is complete; the benchmark never evaluates
    for label in ("real", "ai_generated"):
        src = next((folder / "val" / label).iterdir())
        (folder / "test" / label / src.name).write_bytes(src.read_bytes())
    marker.write_text("ok")


def _step_fn(device: str, crop: int, channels_last: bool = True):
    import torch

    from app.model import ModelConfig, build_model
    from app.transforms import to_model_input

    # channels_last everywhere, as in the training loop (on the CPU too, where it is ~1.5x faster than NCHW)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(ModelConfig()).to(device, memory_format=memory_format)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(images, labels) -> None:
        x = to_model_input(images, device=device, channels_last=channels_last)
        y = labels.to(device, non_blocking=True).float()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_only(device: str, batch: int, crop: int, steps: int, channels_last: bool = True) -> float:
    import torch

    step = _step_fn(device, crop, channels_last)
    images = torch.randint(0, 256, (batch, crop, crop, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    for _ in range(5):
        step(images, labels)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(images, labels)
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


class _FileDataset:
    def __init__(self, records, crop: int) -> None:
        self.paths = list(records["path"])
        self.labels = list(records["label"])
        self.crop = crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        from app.images import decode_image, read_image_bytes
        from app.transforms import AugmentConfig, train_augment

        rng = np.random.default_rng()
        image = decode_image(read_image_bytes(self.paths[i]))
        crop = train_augment(image, self.crop, AugmentConfig(), rng)
        return torch.from_numpy(crop), self.labels[i]


def plain_dataloader(records, device: str, batch: int, crop: int, steps: int, workers: int) -> float:
    import torch

    step = _step_fn(device, crop)
    loader = torch.utils.data.DataLoader(
        _FileDataset(records, crop),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=True,
        drop_last=True,
        persistent_workers=True,
        prefetch_factor=4,
    )
    it = iter(loader)
    for _ in range(3):
        images, labels = next(it)
        step(images, labels)
    _sync(device)
    start, done = time.perf_counter(), 0
    for _ in range(steps):
        try:
            images, labels = next(it)
        except StopIteration:
            it = iter(loader)
            images, labels = next(it)
        step(images, labels)
        done += len(labels)
    _sync(device)
    return done / (time.perf_counter() - start)


def ray_pipeline(
    data_dir: Path,
    device: str,
    batch: int,
    crop: int,
    epochs: int,
    gpus: int,
    decode_on: str = "tasks",
    stats_to: Path | None = None,
) -> dict:
    """The Ray Data -> Ray Train run's rates; with ``stats_to``, Ray Data's per-operator stats of every dataset it
    executed (the train and validation epochs) are copied there from the cluster's logs, to name what bounds it."""
    import ray.data

    from app.config import load_settings
    from app.data import index_dataset
    from app.ray_runtime import init_ray
    from benchmarks.ray_logs import copy_ray_data_logs
    from training.trainer import build_trainer

    # The workers' CPUs come on top of the cores' so Ray Data keeps some to read with (on 2 cores it had none).
    cpus_per_worker = 2
    settings = load_settings(
        work_dir=data_dir / "work",
        ray_num_cpus=(os.cpu_count() or 1) + cpus_per_worker * gpus,
        train={
            "num_workers": gpus,
            "use_gpu": device.startswith("cuda"),
            "batch_size": batch,
            "crop_size": crop,
            "epochs": epochs,
            "max_failures": 0,
            "cpus_per_worker": cpus_per_worker,
            "decode_on": decode_on,
        },
    )
    init_ray(settings)
    ray.data.DataContext.get_current().enable_auto_log_stats = True  # each execution's stats into ray-data's log
    index = index_dataset(str(data_dir))
    trainer = build_trainer(settings, index, use_gpu=device.startswith("cuda"), name=f"throughput-{int(time.time())}")
    result = trainer.fit()
    if stats_to is not None:
        copy_ray_data_logs(stats_to)
    frame = result.metrics_dataframe  # rows of the kept (best) checkpoints, not every epoch
    last = result.metrics  # the last epoch's report
    return {
        "images_per_s": float(last["train_images_per_s_steady"]) / max(1, gpus),
        "images_per_s_whole_epoch": float(last["train_images_per_s"]) / max(1, gpus),
        "time_to_first_batch_s": float(last["time_to_first_batch_s"]),
        "first_epoch_time_to_first_batch_s": float(frame.sort_values("epoch").iloc[0]["time_to_first_batch_s"]),
        "epochs": int(last["epoch"]) + 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=1, help="Ray Train workers for (c), one GPU each")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/aipd-throughput"))
    parser.add_argument("--only", default="abcd", help="which of a, b, c, d to run")
    parser.add_argument("--nchw", action="store_true", help="(a) in NCHW instead of channels_last, for comparison")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import torch

    card = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    started = time.perf_counter()
    make_files(args.data_dir, args.files, args.side)
    print(f"data: {args.files} JPEG files of {args.side} px ready in {time.perf_counter() - started:.1f} s", flush=True)
    results: dict = {
        "card": card,
        "cores": os.cpu_count(),
        "files": args.files,
        "side": args.side,
        "crop": args.crop,
        "batch": args.batch,
    }
    if "a" in args.only:
        results["a_model_only"] = model_only(args.device, args.batch, args.crop, args.steps, not args.nchw)
        print(f"(a) model only: {results['a_model_only']:.0f} img/s", flush=True)
    if "b" in args.only:
        from app.data import index_dataset

        records = index_dataset(str(args.data_dir)).split("train")
        results["b_dataloader"] = plain_dataloader(
            records, args.device, args.batch, args.crop, args.steps, os.cpu_count() or 1
        )
        print(f"(b) DataLoader x{os.cpu_count()}: {results['b_dataloader']:.0f} img/s", flush=True)
    if "c" in args.only:
        stats = args.out.with_suffix(".c-ray-data-logs") if args.out else None
        c = ray_pipeline(args.data_dir, args.device, args.batch, args.crop, args.epochs, args.gpus, stats_to=stats)
        results["c_ray"] = c["images_per_s"]
        results["c_time_to_first_batch_s"] = c["time_to_first_batch_s"]
        results["c_whole_epoch"] = c["images_per_s_whole_epoch"]
        print(
            f"(c) Ray Data -> Ray Train ({args.gpus} GPU): {c['images_per_s']:.0f} img/s per GPU steady, "
            f"{c['images_per_s_whole_epoch']:.0f} over the whole epoch, first batch after "
            f"{c['time_to_first_batch_s']:.1f} s",
            flush=True,
        )
    if "d" in args.only:
        d = ray_pipeline(args.data_dir, args.device, args.batch, args.crop, args.epochs, args.gpus, "workers")
        results["d_ray_gpu_pixels"] = d["images_per_s"]
        results["d_time_to_first_batch_s"] = d["time_to_first_batch_s"]
        results["d_whole_epoch"] = d["images_per_s_whole_epoch"]
        print(
            f"(d) workers decode ({args.gpus} GPU): {d['images_per_s']:.0f} img/s per GPU steady, "
            f"{d['images_per_s_whole_epoch']:.0f} over the whole epoch, first batch after "
            f"{d['time_to_first_batch_s']:.1f} s",
            flush=True,
        )
    columns = ["card", "(a) model only", "(b) DataLoader", "(c) Ray, tasks decode", "(d) Ray, workers decode"]
    print("\n| " + " | ".join([*columns, "c/a", "d/a", "d/b"]) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    a, b = results.get("a_model_only"), results.get("b_dataloader")
    c, d = results.get("c_ray"), results.get("d_ray_gpu_pixels")
    fmt = lambda v: f"{v:.0f}" if v else "-"  # noqa: E731
    ratio = lambda x, y: f"{x / y:.2f}" if x and y else "-"  # noqa: E731
    print(f"| {card} | {fmt(a)} | {fmt(b)} | {fmt(c)} | {fmt(d)} | {ratio(c, a)} | {ratio(d, a)} | {ratio(d, b)} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
