"""Serving load: throughput and p50/p95/p99 latency, side by side in one run, at several concurrencies.

Targets (all started first, then measured one at a time, interleaved per concurrency; an idle target costs next to
nothing, and interleaving makes a drift in the machine's background load hit every target alike):
  noop       a server that reads the upload and answers a fixed JSON: the load generator's own ceiling here. A
             target whose numbers sit near it is limited by the generator, not by itself.
  plain      the original design: one FastAPI + uvicorn process, one forward pass per request
             (benchmarks/plain_fastapi_app.py, same decode/crop/model code as the service).
  unbatched  this service (Ray Serve ingress + detector) with max_batch_size=1: the cost of the architecture alone.
  batched    this service as configured: @serve.batch up to --max-batch-size.
  hops       not a server: the in-process cost of decode + crop per upload size and of one forward per batch size.

Why these numbers: requests/s at each concurrency is what a fleet of clients gets; p50 is the typical answer, p95/p99
the tail a caller's timeout must cover. Concurrency 1 shows the latency floor (no queueing, no batching to gain);
8-128 show where batching pays and where queues grow. Each cell is a closed loop: `c` clients send back to back for
--duration seconds after --warmup seconds; only answers completed inside the window count. With --rounds N each
cell is measured N times, interleaved with the others, and the samples are pooled.

Uploads are real JPEGs (photo-like texture, quality 90) of 224x224 and larger, mixed, sent as multipart/form-data
exactly as `curl -F file=@photo.jpg` does. Access logs are off in every server (as in a production setup that logs
through metrics). The model is --backbone at --crop px, untrained: inference cost does not depend on the weights.

    CPU (this laptop):  python benchmarks/serve_load.py --device cpu --duration 8
    GPU machine:        python benchmarks/serve_load.py --device cuda --ingress-replicas 8 --client-procs 4 \\
                            --max-batch-size 64 --concurrency 1,8,32,64,128
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages come from this checkout

from serving.config import DETECTOR_ENV  # noqa: E402

BOUNDARY = "aipdbenchmarkboundary"
APP_NAME = "bench"


@dataclass
class Cell:
    target: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    ok: int
    errors: int
    server_p50_ms: float | None = None  # the service's own `inference_time_ms`: time inside the ingress
    mean_batch: float | None = None


# ------------------------------------------------------------------------------------------------------ uploads
def make_jpegs(sizes: list[tuple[int, int]], per_size: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth shapes plus sensor-like noise, so they compress (and decode) like photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    jpegs = []
    for width, height in sizes:
        for _ in range(per_size):
            coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
            base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
            pixels = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
            jpegs.append(buffer.getvalue())
    return jpegs


def multipart(jpeg: bytes) -> bytes:
    """The body `curl -F file=@p.jpg` sends."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="p.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + jpeg + f"\r\n--{BOUNDARY}--\r\n".encode()


# ------------------------------------------------------------------------------------------------- load generator
async def _load(url: str, bodies: list[bytes], concurrency: int, warmup: float, duration: float, offset: int):
    import aiohttp

    latencies: list[float] = []
    server_ms: list[float] = []
    errors = 0
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        window_start, window_end = start + warmup, start + warmup + duration

        async def worker(index: int) -> None:
            nonlocal errors
            n = index + offset
            while time.perf_counter() < window_end:
                body = bodies[n % len(bodies)]
                n += concurrency
                sent = time.perf_counter()
                server = None
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        payload = await response.read()
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                done = time.perf_counter()
                if window_start <= done <= window_end:
                    if ok:
                        latencies.append(done - sent)
                        server = json.loads(payload).get("inference_time_ms")
                        if server is not None:
                            server_ms.append(float(server))
                    else:
                        errors += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies, server_ms, errors


def _client_process(args: tuple[str, list[bytes], int, float, float, int]) -> tuple[list[float], list[float], int]:
    """One load-generator process (spawned, so it shares no interpreter lock with the others)."""
    return asyncio.run(_load(*args))


@dataclass
class Samples:
    """Everything measured for one (target, concurrency), pooled over rounds."""

    latencies_s: list[float]
    server_ms: list[float]
    errors: int = 0
    seconds: float = 0.0
    images: float = 0.0
    batches: float = 0.0

    def cell(self, target: str, concurrency: int) -> Cell:
        values = np.array(self.latencies_s) * 1000.0 if self.latencies_s else np.array([float("nan")])
        p50, p95, p99 = (float(np.percentile(values, q)) for q in (50, 95, 99))
        server = float(np.median(self.server_ms)) if self.server_ms else None
        return Cell(
            target,
            concurrency,
            len(self.latencies_s) / self.seconds,
            p50,
            p95,
            p99,
            len(self.latencies_s),
            self.errors,
            server,
            self.images / self.batches if self.batches else None,
        )


def run_load(
    pool, url: str, bodies: list[bytes], concurrency: int, warmup: float, duration: float, procs: int, into: Samples
) -> None:
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    jobs = [(url, bodies, share, warmup, duration, i * 7919) for i, share in enumerate(shares)]
    for latencies, server_ms, errors in pool.map(_client_process, jobs):
        into.latencies_s += latencies
        into.server_ms += server_ms
        into.errors += errors
    into.seconds += duration


# ------------------------------------------------------------------------------------------------------ per hop
def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000.0


def profile_hops(
    checkpoint: str, jpegs: list[bytes], sizes: list[tuple[int, int]], args: argparse.Namespace
) -> list[str]:
    """The in-process cost of each step a request takes, to read the load table against: what the ingress spends
    decoding and cropping each upload size, and what one forward pass costs at each batch size on this device.
    (End to end minus the service's own `inference_time_ms` is the proxy and HTTP hop; `inference_time_ms` minus
    decode and forward is the ingress-to-detector hop plus batch waiting.)"""
    from app.config import ImageLimits, Settings
    from serving.ingress import decode_and_crop
    from serving.runtime import available_cores, load_active, pick_device, run_batch

    lines = ["| step | size | ms |", "| --- | --- | ---: |"]
    per_size = len(jpegs) // len(sizes)
    for index, (width, height) in enumerate(sizes):
        sample = jpegs[index * per_size]
        ms = _median_ms(functools.partial(decode_and_crop, sample, args.crop, ImageLimits()), 20)
        lines.append(f"| decode + crop (ingress) | {width}x{height} JPEG, {len(sample) // 1024} KiB | {ms:.2f} |")
    device = pick_device(args.device == "cuda")
    if device.type == "cpu":
        import torch

        torch.set_num_threads(args.torch_threads or available_cores())
    active = load_active(
        Settings(), checkpoint, device, warmup_sizes=(1, args.max_batch_size), precision=args.precision
    )
    crop = np.zeros((args.crop, args.crop, 3), np.uint8)
    for batch in sorted({1, 8, args.max_batch_size}):
        ms = _median_ms(functools.partial(run_batch, active, [crop] * batch), 10 if device.type == "cpu" else 50)
        lines.append(
            f"| forward, {args.backbone} {args.crop}px ({device.type}, {'bf16' if active.bf16 else 'fp32'}) "
            f"| batch {batch} | "
            f"{ms:.2f} ({ms / batch:.2f} per image) |"
        )
    for line in lines[2:]:
        print("  " + line, flush=True)
    return lines


# --------------------------------------------------------------------------------------------------- the servers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout_s: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become ready in {timeout_s:.0f} s")


class Subprocess:
    """A baseline server in its own process (plain or noop)."""

    def __init__(self, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # the same OpenMP wait policy as the service's detector (serving.config.DETECTOR_ENV): a fair comparison
        env = {**os.environ, **DETECTOR_ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "plain_fastapi_app.py"), "--port", str(self.port), *self.extra],
            env=env,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"baseline server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("baseline server did not start")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class ServeTarget:
    """The Ray Serve application with the given batch size, deployed under /<name> beside the other targets."""

    def __init__(
        self, name: str, port: int, checkpoint: str, args: argparse.Namespace, max_batch_size: int, num_gpus: float
    ) -> None:
        from app.config import Settings
        from serving.config import AppArgs

        self.name = name
        self.url = f"http://127.0.0.1:{port}/{name}"
        self.num_gpus = num_gpus
        self.settings = Settings(
            work_dir=Path(tempfile.gettempdir()) / "aipd-bench",
            log_level="WARNING",
            serve={
                "model_uri": checkpoint,
                "max_batch_size": max_batch_size,
                "batch_wait_timeout_s": args.batch_wait_ms / 1000.0,
                "rate_limit_per_minute": 0,
                "ingress_min_replicas": args.ingress_replicas,
                "ingress_max_replicas": args.ingress_replicas,
                "detector_min_replicas": args.replicas,
                "detector_max_replicas": args.replicas,
                "use_gpu": args.device == "cuda",
            },
        )
        self.app_args = AppArgs(
            champion_poll_s=0, torch_threads=args.torch_threads, precision=args.precision, autoscaling={}
        )

    def start(self) -> None:
        from ray import serve

        from serving.app_builder import build_application

        serve.run(
            build_application(self.settings, self.app_args, num_gpus=self.num_gpus),
            name=self.name,
            route_prefix=f"/{self.name}",
            logging_config={"log_level": "WARNING", "enable_access_log": False},
        )
        wait_http(self.url + "/health")

    def metrics(self) -> str:
        import httpx

        return httpx.get(self.url + "/metrics", timeout=30).text

    def stop(self) -> None:
        from ray import serve

        from serving.metrics import drop_store

        serve.delete(self.name)
        drop_store(self.name)


def batch_counts(text: str) -> tuple[float, float]:
    """(images, batches) the detector has run so far, from the application's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    def read(name: str) -> float:
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    return read("prediction_batch_size_sum"), read("prediction_batch_size_count")


# ------------------------------------------------------------------------------------------------------- report
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{os.cpu_count()} cores ({cpu})"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return text


def table(cells: list[Cell]) -> str:
    lines = [
        "| target | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors | server p50 ms | mean batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cells:
        batch = f"{c.mean_batch:.1f}" if c.mean_batch else "-"
        server = f"{c.server_p50_ms:.1f}" if c.server_p50_ms is not None else "-"
        lines.append(
            f"| {c.target} | {c.concurrency} | {c.requests_per_s:.1f} | {c.p50_ms:.1f} | {c.p95_ms:.1f} | "
            f"{c.p99_ms:.1f} | {c.errors} | {server} | {batch} |"
        )
    return "\n".join(lines)


def summary(cells: list[Cell], check: int) -> str:
    by = {(c.target, c.concurrency): c for c in cells}
    lines = []
    if ("batched", 1) in by:
        lines.append(f"single-request p50 (batched, c=1): {by['batched', 1].p50_ms:.1f} ms")
    if ("batched", check) in by and ("plain", check) in by:
        ratio = by["batched", check].requests_per_s / max(by["plain", check].requests_per_s, 1e-9)
        lines.append(f"batched / plain throughput at c={check}: {ratio:.2f}x")
    if ("batched", check) in by and ("unbatched", check) in by:
        ratio = by["batched", check].requests_per_s / max(by["unbatched", check].requests_per_s, 1e-9)
        lines.append(f"batched / unbatched throughput at c={check}: {ratio:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--targets", default="hops,noop,plain,unbatched,batched")
    parser.add_argument("--concurrency", default="1,8,32,64,128")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds run before each cell's window")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="passes over all cells, targets interleaved; samples are pooled across rounds",
    )
    parser.add_argument("--replicas", type=int, default=1, help="detector replicas (one GPU each on cuda)")
    parser.add_argument("--ingress-replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--torch-threads", type=int, default=None, help="CPU inference threads per detector replica")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 on GPU, float32 on CPU; every target uses the same",
    )
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--sizes", default="224x224,320x240,512x384,640x480,1024x768", help="JPEG sizes, mixed")
    parser.add_argument("--client-procs", type=int, default=1, help="load generator processes")
    parser.add_argument("--check-at", type=int, default=32, help="concurrency of the summary ratios")
    parser.add_argument("--json-out", type=Path, help="write every cell as JSON here")
    parser.add_argument("--address", help="Ray cluster address (default: start a local one)")
    parser.add_argument(
        "--serve-throughput-optimized",
        action="store_true",
        help="start the local cluster with RAY_SERVE_THROUGHPUT_OPTIMIZED=1",
    )
    args = parser.parse_args()

    os.environ.update(DETECTOR_ENV)  # before torch loads OpenMP: the hop profile runs in this process
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    jpegs = make_jpegs(sizes, per_size=8)
    bodies = [multipart(jpeg) for jpeg in jpegs]
    print(
        f"machine: {machine()}; uploads: {len(bodies)} JPEGs, mean {np.mean([len(b) for b in bodies]) / 1024:.0f} KiB",
        flush=True,
    )

    import multiprocessing

    from app.model import ModelConfig, PreprocessSettings, build_model, save_checkpoint

    workdir = Path(tempfile.mkdtemp(prefix="aipd-serve-load-"))
    checkpoint = str(workdir / "checkpoint")
    cfg = ModelConfig(backbone=args.backbone)
    save_checkpoint(checkpoint, build_model(cfg), cfg, PreprocessSettings(crop_size=args.crop))

    hops = profile_hops(checkpoint, jpegs, sizes, args) if "hops" in targets else []
    servers: dict[str, Any] = {}
    samples: dict[tuple[str, int], Samples] = {}
    try:
        if "noop" in targets:
            servers["noop"] = Subprocess(["--noop"])
            servers["noop"].start()
        if "plain" in targets:
            servers["plain"] = Subprocess(
                ["--checkpoint", checkpoint, "--device", args.device, "--precision", args.precision]
            )
            servers["plain"].start()
            wait_http(servers["plain"].url + "/health")
        serve_targets = [t for t in ("unbatched", "batched") if t in targets]
        if serve_targets:
            from ray import serve

            from app.config import Settings
            from app.ray_runtime import init_ray

            # Ray starts its workers at nice 15 so they never starve the raylet; the baselines run at nice 0. On a
            # machine shared with other work that alone halves the service's share of the CPU, so for a like-for-like
            # comparison a local cluster's workers start at the baselines' priority.
            os.environ.setdefault("RAY_worker_niceness", "0")
            if args.serve_throughput_optimized:  # Serve's own switch: gRPC proxy-to-replica, one loop per replica
                os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
            resources = init_ray(Settings(ray_address=args.address), include_dashboard=False, log_to_driver=False)
            # Every target stays up while the others are measured (idle, they cost next to nothing), so a drift in
            # the machine's background load hits all of them alike; on one GPU the two applications share it.
            gpus = resources.get("GPU", 0) / (len(serve_targets) * args.replicas) if args.device == "cuda" else 0.0
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for target in serve_targets:
                batch = 1 if target == "unbatched" else args.max_batch_size
                servers[target] = ServeTarget(target, port, checkpoint, args, batch, min(gpus, 1.0))
                servers[target].start()

        with multiprocessing.get_context("spawn").Pool(args.client_procs) as pool:
            for round_index in range(args.rounds):
                for concurrency in concurrencies:
                    for target in [t for t in ("noop", "plain", "unbatched", "batched") if t in servers]:
                        server = servers[target]
                        into = samples.setdefault((target, concurrency), Samples([], []))
                        before = batch_counts(server.metrics()) if isinstance(server, ServeTarget) else None
                        run_load(
                            pool,
                            server.url + "/predict",
                            bodies,
                            concurrency,
                            args.warmup,
                            args.duration,
                            args.client_procs,
                            into,
                        )
                        if before is not None:
                            after = batch_counts(server.metrics())
                            into.images += after[0] - before[0]
                            into.batches += after[1] - before[1]
                        cell = into.cell(target, concurrency)
                        print(
                            f"  round {round_index + 1} {target:>9} c={concurrency:<4} {cell.requests_per_s:8.1f} req/s"
                            f"  p50 {cell.p50_ms:7.1f}  p95 {cell.p95_ms:7.1f}  p99 {cell.p99_ms:7.1f} ms  "
                            f"errors {cell.errors}"
                            + (f"  mean batch {cell.mean_batch:.1f}" if cell.mean_batch else ""),
                            flush=True,
                        )
    finally:
        for server in servers.values():
            server.stop()
        if any(isinstance(server, ServeTarget) for server in servers.values()):
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    order = {"noop": 0, "plain": 1, "unbatched": 2, "batched": 3}
    cells = [samples[key].cell(*key) for key in sorted(samples, key=lambda k: (order[k[0]], k[1]))]

    print(f"\nmachine: {machine()}\n")
    if hops:
        print("\n".join(hops) + "\n")
    print(table(cells))
    print()
    print(summary(cells, args.check_at))
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "args": vars(args) | {"json_out": str(args.json_out)},
                    "hops": hops,
                    "cells": [asdict(c) for c in cells],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
