"""Catalog scan throughput: `aipd scan` against the model alone, the node's decoding ceiling and a plain DataLoader.

Why each number: a scan is a throughput job, so what matters is images per second against what the node can do.
  model      the GPU ceiling: the scan's model runtime (CUDA graphs, bf16) replaying batches already on the GPU.
  decode     the CPU ceiling: the scan's own read + validate + decode + crop (`serving.scan.read_and_crop`) in a process
             pool of one worker per core, nothing sent back but a count.
  read       the read ceiling of a scan that decodes on the GPU: the same pool reading, hashing and checking only
             (`read_and_crop(decode=False)`).
  gpu_decode the GPU pixel ceiling: photos already in memory decoded and cropped on the GPU in batches
             (`app.pixels.decode_crops`, nvJPEG) and scored (`score_batch`), one process; "gpu decode only" beside it.
  dataloader the plain PyTorch loop most projects ship: a `DataLoader` with one worker per core running that same
             decode, feeding the same model runtime in the main process.
  scan       `serving.scan.run_scan` (what `aipd scan` runs) on a running Ray cluster, with its defaults
             (`serve.decode_on: auto`, `serving.config.resolve_decode_on`): images/s over the whole scan, the steady
             rate, the time to its first output file, and the peak object-store memory while it ran.
  scan_queued the default scan with 8 batches queued on each model actor instead of Ray Data's 2;
  scan_uncapped, scan_queued_uncapped the same without Ray Data's downstream-capacity backpressure;
  scan_files32, scan_files128, scan_files256 the default scan with that many files per reading task.
  scan_cpu   on a GPU, the same scan with `serve.decode_on: ingress` (the reading tasks decode on the CPUs), and
  scan_gpu   with `serve.decode_on: detector` (the model actors decode on the GPU, `app.pixels.decode_crops`);
  scan_shared scan_gpu with two model actors on each card, so one decodes while the other runs the model.
             Ray Data's per-operator stats of each scan land beside --json-out (`*.scan-stats.txt`, ...), and its
             logs of every scan in `*.scan-ray-data-logs/`.
The targets: a scan that decodes on the CPUs >= 80% of min(model, decode); one that decodes on the GPU >= 80% of
min(gpu_decode, read); the better scan's whole run >= 2x dataloader.

Data: --files JPEGs of 256-1024 px (photo-like texture, quality 90) on local disk, written once per run: the first
10,000 distinct, the rest hard links to them (each path is read and decoded as its own file).

    GPU machine:   python benchmarks/scan_throughput.py --device cuda --files 20000 --gpus 1
    this laptop:   python benchmarks/scan_throughput.py --device cpu --demo   (the demo test split: the 2-core target)
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _write_jpegs(args: tuple[str, int, int]) -> int:
    from PIL import Image

    folder, start, count = args
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        width, height = (int(v) for v in rng.integers(256, 1025, 2))
        coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
        pixels = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        (Path(folder) / f"{i:07d}.jpg").write_bytes(buffer.getvalue())
    return count


def make_catalog(folder: Path, files: int, distinct: int = 10_000) -> list[str]:
    """``files`` paths, of which the first ``distinct`` are photos of their own and the rest hard links to them: every
    path is read, hashed and decoded as its own file, and a catalog of 100,000 is written in seconds, not minutes."""
    folder.mkdir(parents=True, exist_ok=True)
    distinct = min(files, distinct)
    chunk = 250
    jobs = [(str(folder), start, min(chunk, distinct - start)) for start in range(0, distinct, chunk)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        sum(pool.imap_unordered(_write_jpegs, jobs))
    for i in range(distinct, files):
        os.link(folder / f"{i % distinct:07d}.jpg", folder / f"{i:07d}.jpg")
    return sorted(str(p) for p in folder.glob("*.jpg"))


def _decode_count(args: tuple[list[str], int, bool]) -> int:
    from app.config import ImageLimits
    from serving.scan import read_and_crop

    paths, crop, decode = args
    batch = read_and_crop(
        {"path": np.array(paths, dtype=object), "label": np.full(len(paths), -1)}, crop, ImageLimits(), decode
    )
    return int(batch["ok"].sum())


def device_decode_rate(paths: list[str], active, batch: int, score: bool, limit: int = 4096) -> float:
    """Photos already in memory, decoded and cropped on the model's device in batches (and scored when ``score``)."""
    import torch

    from app.config import ImageLimits
    from app.pixels import decode_crops
    from serving.runtime import score_batch

    photos = [Path(path).read_bytes() for path in paths[:limit]]
    batches = [photos[i : i + batch] for i in range(0, len(photos), batch)]

    def one(chunk: list[bytes]) -> None:
        crops = decode_crops(chunk, active.crop_size, active.device, ImageLimits())
        if score:
            score_batch(active, crops)
        elif active.device.type == "cuda":
            torch.cuda.synchronize()

    one(batches[0])
    started = time.perf_counter()
    for chunk in batches:
        one(chunk)
    return len(photos) / (time.perf_counter() - started)


def decode_ceiling(paths: list[str], crop: int, decode: bool = True) -> float:
    jobs = [(paths[i : i + 32], crop, decode) for i in range(0, len(paths), 32)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.map(_decode_count, jobs[:4])  # start the workers and import the project first
        started = time.perf_counter()
        done = sum(pool.imap_unordered(_decode_count, jobs))
    return done / (time.perf_counter() - started)


def load(checkpoint: str, device: str, batch: int):
    from app.config import Settings
    from serving.runtime import available_cores, load_active, pick_device

    torch_device = pick_device(device == "cuda")
    if torch_device.type == "cpu":
        import torch

        torch.set_num_threads(available_cores())
    return load_active(Settings(), checkpoint, torch_device, warmup_sizes=(batch,))


def model_ceiling(active, batch: int, seconds: float = 5.0) -> tuple[float, float]:
    """(replay of batches already on the GPU, run_batch from host crops) in images/s."""
    import torch

    from serving.runtime import run_batch

    crops = [np.random.default_rng(i).integers(0, 256, (active.crop_size,) * 2 + (3,), np.uint8) for i in range(batch)]
    host_rate = _rate(lambda: run_batch(active, crops), batch, seconds)
    graphed = active.graphs.get(batch)
    if graphed is None:
        return host_rate, host_rate

    def replay() -> None:
        graphed.graph.replay()
        torch.cuda.synchronize()

    return _rate(replay, batch, seconds), host_rate


def _rate(step, batch: int, seconds: float) -> float:
    step()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        count += batch
    return count / (time.perf_counter() - started)


class _Files:
    def __init__(self, paths: list[str], crop: int) -> None:
        self.paths, self.crop = paths, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        from app.config import ImageLimits
        from serving.scan import read_and_crop

        one = read_and_crop(
            {"path": np.array([self.paths[index]], dtype=object), "label": np.array([-1])}, self.crop, ImageLimits()
        )
        return one["crop"][0]


def dataloader_rate(paths: list[str], active, batch: int) -> float:
    import torch

    from serving.runtime import run_batch

    loader = torch.utils.data.DataLoader(
        _Files(paths, active.crop_size),
        batch_size=batch,
        num_workers=os.cpu_count(),
        pin_memory=False,
        collate_fn=lambda items: items,
        prefetch_factor=4,
        persistent_workers=False,
    )
    started, done = time.perf_counter(), 0
    for items in loader:
        run_batch(active, items)
        done += len(items)
    return done / (time.perf_counter() - started)


class _Watch(threading.Thread):
    """Polls the output folder for its files (when each appeared) and Ray's object store for its peak use while a
    scan runs."""

    def __init__(self, out: Path) -> None:
        super().__init__(daemon=True)
        self.out, self.files, self.peak_bytes = out, {}, 0
        self.started, self.stop = time.perf_counter(), threading.Event()

    @property
    def first_file_s(self) -> float | None:
        return min(self.files.values()) if self.files else None

    def steady_rate(self) -> float:
        """Images/s from the first output file to the last: the scan's rate once its actors are up."""
        import pyarrow.parquet as pq

        if len(self.files) < 2:
            return float("nan")
        ordered = sorted(self.files.items(), key=lambda item: item[1])
        rows = sum(pq.read_metadata(path).num_rows for path, _ in ordered[1:])
        span = ordered[-1][1] - ordered[0][1]
        return rows / span if span > 0 else float("nan")

    def run(self) -> None:
        import ray

        while not self.stop.wait(0.1):
            if self.out.is_dir():
                for path in self.out.glob("*.parquet"):
                    self.files.setdefault(str(path), time.perf_counter() - self.started)
            try:
                total = ray.cluster_resources().get("object_store_memory", 0)
                free = ray.available_resources().get("object_store_memory", total)
                self.peak_bytes = max(self.peak_bytes, int(total - free))
            except Exception:  # noqa: BLE001 - a missed sample only lowers the peak
                pass


@dataclass(frozen=True)
class ScanVariant:
    """One scan step: `run_scan` with these arguments (None: its default) and these Ray Data settings."""

    name: str
    decode_on: str = "auto"  # serve.decode_on
    actors_per_gpu: int = 1
    batches_per_actor: int | None = None
    files_per_task: int | None = None
    data_context: dict[str, object] = field(default_factory=dict)


NO_DOWNSTREAM_CAP = {"downstream_capacity_backpressure_ratio": None}
SCANS = [
    ScanVariant("scan"),
    ScanVariant("scan_queued", batches_per_actor=8),
    ScanVariant("scan_uncapped", data_context=NO_DOWNSTREAM_CAP),
    ScanVariant("scan_queued_uncapped", batches_per_actor=8, data_context=NO_DOWNSTREAM_CAP),
    ScanVariant("scan_files32", files_per_task=32),
    ScanVariant("scan_files128", files_per_task=128),
    ScanVariant("scan_files256", files_per_task=256),
    ScanVariant("scan_cpu", decode_on="ingress"),
    ScanVariant("scan_gpu", decode_on="detector"),
    ScanVariant("scan_shared", decode_on="detector", actors_per_gpu=2),
]


def scan_rate(
    folder: Path,
    checkpoint: str,
    batch: int,
    gpus: int,
    device: str,
    variant: ScanVariant,
    stats_out: Path | None = None,
) -> dict[str, float]:
    import ray.data

    from app.config import Settings
    from serving.scan import run_scan

    out = Path(tempfile.mkdtemp(prefix="aipd-scan-out-")) / "out"
    settings = Settings(serve={"use_gpu": device == "cuda", "decode_on": variant.decode_on})
    context = ray.data.DataContext.get_current()
    before = {key: getattr(context, key) for key in variant.data_context}
    watch = _Watch(out)
    try:
        for key, value in variant.data_context.items():  # the Ray Data settings under test, for this scan only
            setattr(context, key, value)
        watch.start()
        actors = gpus * variant.actors_per_gpu
        summary = run_scan(  # files of 1,024 rows: the time each lands gives the steady rate
            settings,
            [str(folder)],
            str(out),
            model_uri=checkpoint,
            batch_size=batch,
            concurrency=(actors, actors) if device == "cuda" else None,
            rows_per_file=1024,
            actors_per_gpu=variant.actors_per_gpu,
            batches_per_actor=variant.batches_per_actor,
            files_per_task=variant.files_per_task,
        )
    finally:
        watch.stop.set()
        for key, value in before.items():
            setattr(context, key, value)
    if stats_out is not None:
        stats_out.write_text(summary.operator_stats)
    return {
        "images_per_s": summary.images_per_s,
        "steady_images_per_s": watch.steady_rate(),
        "seconds": summary.seconds,
        "files": summary.files,
        "errors": summary.errors,
        "first_output_file_s": watch.first_file_s or float("nan"),
        "peak_object_store_mib": watch.peak_bytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--gpus", type=int, default=1, help="model actors, one GPU each")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--steps", default="model,decode,dataloader,scan")
    parser.add_argument("--demo", action="store_true", help="scan the demo data's test split (the CPU target)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    steps = set(args.steps.split(","))

    from app.config import Settings
    from app.model import ModelConfig, PreprocessSettings, build_model, save_checkpoint
    from app.ray_runtime import init_ray
    from serving.config import resolve_decode_on

    work = Path(tempfile.mkdtemp(prefix="aipd-scan-bench-"))
    checkpoint = str(work / "checkpoint")
    crop = 112 if args.demo else args.crop  # the demo model's crop (train.crop_size)
    cfg = ModelConfig()
    save_checkpoint(checkpoint, build_model(cfg), cfg, PreprocessSettings(crop_size=crop))
    if args.demo:
        from app.demo import build_demo_dataset

        demo = build_demo_dataset(work / "demo", images_per_class=1200, size=128, seed=0)
        folder = Path(demo.out_dir) / "test"
        paths = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    else:
        started = time.perf_counter()
        folder = work / "catalog"
        paths = make_catalog(folder, args.files)
        print(f"wrote {len(paths)} JPEGs in {time.perf_counter() - started:.0f} s", flush=True)
    results: dict[str, object] = {"files": len(paths), "cores": os.cpu_count(), "batch": args.batch}
    try:
        import torch

        results["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        results["gpus_visible"] = torch.cuda.device_count()
    except ImportError:
        pass

    if "model" in steps:
        active = load(checkpoint, args.device, args.batch)
        results["model_replay"], results["model_from_host"] = model_ceiling(active, args.batch)
        print(
            f"model: {results['model_replay']:.0f} img/s on the GPU, {results['model_from_host']:.0f} from host",
            flush=True,
        )
    if "decode" in steps:
        results["decode"] = decode_ceiling(paths, crop)
        print(f"decode ceiling: {results['decode']:.0f} img/s on {os.cpu_count()} cores", flush=True)
    if "read" in steps:
        results["read"] = decode_ceiling(paths, crop, decode=False)
        print(f"read + hash + check ceiling: {results['read']:.0f} img/s on {os.cpu_count()} cores", flush=True)
    if "gpu_decode" in steps:
        active = load(checkpoint, args.device, args.batch)
        results["gpu_decode_only"] = device_decode_rate(paths, active, args.batch, score=False)
        results["gpu_decode"] = device_decode_rate(paths, active, args.batch, score=True)
        print(
            f"device decode: {results['gpu_decode_only']:.0f} img/s, with the model {results['gpu_decode']:.0f}",
            flush=True,
        )
    if "dataloader" in steps:
        active = load(checkpoint, args.device, args.batch)
        results["dataloader"] = dataloader_rate(paths, active, args.batch)
        print(f"dataloader: {results['dataloader']:.0f} img/s", flush=True)
    default_at = resolve_decode_on(Settings(), args.gpus if args.device == "cuda" else 0)
    if steps & {variant.name for variant in SCANS}:
        ray_started = time.perf_counter()
        init_ray(Settings(), include_dashboard=False, log_to_driver=False)
        results["ray_start_s"] = time.perf_counter() - ray_started
    for variant in SCANS:
        name = variant.name
        if name not in steps or (variant.decode_on != "auto" and args.device != "cuda"):
            continue
        results[name] = scan_rate(
            folder,
            checkpoint,
            args.batch if args.device == "cuda" else 16,
            args.gpus,
            args.device,
            variant,
            stats_out=args.json_out.with_suffix(f".{name.replace('_', '-')}-stats.txt") if args.json_out else None,
        )
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        if args.json_out:  # after each scan, so a run cut short keeps what held the reads or the actors idle
            from benchmarks.ray_logs import copy_ray_data_logs

            copy_ray_data_logs(args.json_out.with_suffix(".scan-ray-data-logs"))

    print(
        "\n| card | files | model img/s | decode img/s | read img/s | gpu decode (+model) img/s | dataloader img/s "
        "| scan | steady (whole run) img/s | / its ceiling | whole run / dataloader | first output file s "
        "| peak object store MiB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")

    def fmt(key: str) -> str:
        return f"{results[key]:.0f}" if key in results else "-"

    card = f"{results.get('gpu') or 'cpu'} x{args.gpus if args.device == 'cuda' else 0}"
    ceilings = (
        f"{fmt('model_replay')} | {fmt('decode')} | {fmt('read')} | {fmt('gpu_decode_only')} ({fmt('gpu_decode')})"
    )
    for variant in SCANS:
        name = variant.name
        found = results.get(name)
        if not isinstance(found, dict):
            continue
        # each scan against the pixel ceiling of where it decodes
        decodes_at = default_at if variant.decode_on == "auto" else variant.decode_on
        keys = ("model_replay", "decode") if decodes_at == "ingress" else ("gpu_decode", "read")
        ceiling = min((results[k] for k in keys if k in results), default=None)
        steady, whole = found["steady_images_per_s"], found["images_per_s"]
        of_ceiling = f"{steady / ceiling:.2f}" if ceiling else "-"
        of_loader = f"{whole / results['dataloader']:.2f}x" if "dataloader" in results else "-"
        print(
            f"| {card} | {len(paths)} | {ceilings} | {fmt('dataloader')} | {name} | {steady:.0f} ({whole:.0f}) | "
            f"{of_ceiling} | {of_loader} | {found['first_output_file_s']:.1f} | {found['peak_object_store_mib']:.0f} |"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
