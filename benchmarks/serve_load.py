"""Serving load: throughput and p50/p95/p99 latency, side by side in one run, at several concurrencies, with the time
of every hop inside the service.

Targets (started first, then measured one at a time, interleaved per concurrency, so a drift in the machine's
background load hits every target alike; an idle target costs next to nothing):
  noop       a raw ASGI server (one process per load-generator process) that reads the upload and answers a fixed
             JSON: the load generator's own ceiling on this node. A target near it is limited by the generator.
  plain      the original design: one FastAPI + uvicorn process, one forward pass per request
             (benchmarks/plain_fastapi_app.py, the same decode, crop and model runtime as the service).
  batched    this service as `aipd serve` starts it: Ray Serve's high-throughput data path (HAProxy ingress, gRPC
             between deployments) and continuous batching up to --max-batch-size: on a CPU-only node in the layout
             `aipd serve` picks (colocated, one deployment), on a GPU in the split layout the earlier GPU
             measurements used (`colocated_cpu` and `sized` are the GPU default).
  split      the same, always in the split layout (ingress and detector deployments): on a CPU node, the hop's cost.
  ingress_decode  split, the ingress decoding each upload on its CPUs and sending the crop (`serve.decode_on:
             ingress`): a GPU node's layout before the detector decoded on the GPU, the baseline of that change.
  colocated_gpu   one deployment of --ingress-replicas replicas, each holding an equal share of the GPU and doing
             everything in one process (checks, GPU decode, batch, forward): no hop between deployments.
             `colocated_gpuN` is the same with N replicas (colocated_gpu4, colocated_gpu16).
  colocated_cpu   colocated_gpu with each replica decoding every upload on its CPUs (`serve.decode_on: ingress`):
             the GPU's decode against the cores', in one layout.
  sized      `aipd serve` with no flags on this node (the rate limit aside): the replica counts and batch size
             `serving.config.sized_for_node` picks from the cluster's CPUs and GPUs.
  unbatched  the same as batched with max_batch_size=1: the cost of the architecture alone.
  cached     the same as batched with the answer cache on: the uploads repeat, so after the warm-up every answer is a
             cache hit (the photo hashed, the answer looked up); the other Serve targets run with the cache off, so
             they measure the model.
  default    this service, batched, on Ray Serve's default data path (Python proxy, actor calls): measured in a second
             Ray cluster after the first one stops, since Serve reads the switch once per process.
  hops       not a server: the in-process cost of decode + crop per upload size and of one forward per batch size.

Per hop: every answer of the service carries a `Server-Timing` header (read, decode, queue, device_decode, forward,
hop, total; see serving/ingress.py); the table gives their medians per cell, and "edge" is the client's latency minus
the service's total: HAProxy (or the Python proxy) and HTTP. Each cell is a closed loop: `c` clients send back to
back for --duration seconds after --warmup seconds; only answers completed inside the window count.

Uploads are real JPEGs (photo-like texture, quality 90) of 224x224 and larger, mixed, sent as multipart/form-data
exactly as `curl -F file=@photo.jpg` does. The model is --backbone at --crop px, untrained: inference cost does not
depend on the weights.

    CPU (this laptop):  python benchmarks/serve_load.py --device cpu --duration 8
    GPU machine:        python benchmarks/serve_load.py --device cuda --ingress-replicas 8 --client-procs 6 \\
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
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages come from this checkout

from app.ray_runtime import free_port  # noqa: E402
from serving.config import DETECTOR_ENV  # noqa: E402

BOUNDARY = "aipdbenchmarkboundary"
LAYOUTS = {"split": "split", "ingress_decode": "split", "colocated_gpu": "colocated", "colocated_cpu": "colocated"}
SERVE_TARGETS = ("batched", "split", "ingress_decode", "colocated_gpu", "colocated_cpu", "sized", "unbatched", "cached")
ORDER = (
    "noop",
    "plain",
    "unbatched",
    "split",
    "ingress_decode",
    "batched",
    "colocated_gpu",
    "colocated_cpu",
    "sized",
    "cached",
    "default",
)
HOPS = ("edge", "read", "decode", "hop", "queue", "device_decode", "forward")


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
    mean_batch: float | None = None
    hops_ms: dict[str, float] = field(default_factory=dict)  # medians of the Server-Timing spans, plus "edge"


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


def parse_server_timing(header: str | None) -> dict[str, float]:
    """`read;dur=0.31, decode;dur=2.05, ...` -> {"read": 0.31, "decode": 2.05, ...} in milliseconds."""
    spans: dict[str, float] = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";dur=")
        if name and rest:
            spans[name] = float(rest)
    return spans


# ------------------------------------------------------------------------------------------------- load generator
async def _load(url: str, bodies: list[bytes], concurrency: int, warmup: float, duration: float, offset: int):
    import aiohttp

    latencies: list[float] = []
    timings: list[dict[str, float]] = []
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
                timing = None
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        ok = response.status == 200
                        timing = response.headers.get("Server-Timing")
                except aiohttp.ClientError:
                    ok = False
                done = time.perf_counter()
                if window_start <= done <= window_end:
                    if ok:
                        latencies.append(done - sent)
                        spans = parse_server_timing(timing)
                        if "total" in spans:
                            spans["edge"] = (done - sent) * 1000.0 - spans["total"]
                            timings.append(spans)
                    else:
                        errors += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies, timings, errors


def _client_process(args: tuple[str, list[bytes], int, float, float, int]) -> tuple[list, list, int]:
    """One load-generator process (spawned, so it shares no interpreter lock with the others)."""
    return asyncio.run(_load(*args))


@dataclass
class Samples:
    """Everything measured for one (target, concurrency), pooled over rounds."""

    latencies_s: list[float] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    images: float = 0.0
    batches: float = 0.0

    def cell(self, target: str, concurrency: int) -> Cell:
        values = np.array(self.latencies_s) * 1000.0 if self.latencies_s else np.array([float("nan")])
        p50, p95, p99 = (float(np.percentile(values, q)) for q in (50, 95, 99))
        hops = {
            name: float(np.median([t[name] for t in self.timings if name in t]))
            for name in HOPS
            if any(name in t for t in self.timings)
        }
        return Cell(
            target,
            concurrency,
            len(self.latencies_s) / self.seconds,
            p50,
            p95,
            p99,
            len(self.latencies_s),
            self.errors,
            self.images / self.batches if self.batches else None,
            hops,
        )


def run_load(pool, url, bodies, concurrency, warmup, duration, procs, into: Samples) -> None:
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    jobs = [(url, bodies, share, warmup, duration, i * 7919) for i, share in enumerate(shares)]
    for latencies, timings, errors in pool.map(_client_process, jobs):
        into.latencies_s += latencies
        into.timings += timings
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


def profile_hops(checkpoint: str, jpegs: list[bytes], sizes: list[tuple[int, int]], args) -> list[str]:
    """In-process cost of each step: decode + crop per upload size (what the ingress spends), and one forward per
    batch size on this device, eager and (on a GPU) replayed as a CUDA graph (what the detector spends)."""
    from app.config import ImageLimits, Settings
    from serving.image_checks import decode_and_crop
    from serving.runtime import available_cores, load_active, pick_device, run_batch, warmup_sizes

    lines = ["| step | size | ms |", "| --- | --- | ---: |"]
    per_size = len(jpegs) // len(sizes)
    from app.pixels import decode_crops
    from serving.image_checks import check_upload

    for index, (width, height) in enumerate(sizes):
        sample = jpegs[index * per_size]
        ms = _median_ms(functools.partial(decode_and_crop, sample, args.crop, ImageLimits()), 20)
        lines.append(f"| decode + crop (ingress) | {width}x{height} JPEG, {len(sample) // 1024} KiB | {ms:.2f} |")
        ms = _median_ms(functools.partial(check_upload, sample, ImageLimits()), 20)
        lines.append(f"| header check (ingress, detector decodes) | {width}x{height} JPEG | {ms:.3f} |")
    device = pick_device(args.device == "cuda")
    for batch in sorted({1, 16, args.max_batch_size}):
        chunk = [jpegs[i % len(jpegs)] for i in range(batch)]

        def decode(chunk: list[bytes] = chunk) -> None:
            decode_crops(chunk, args.crop, device, ImageLimits())
            if device.type == "cuda":
                import torch

                torch.cuda.synchronize()

        ms = _median_ms(decode, 10)
        lines.append(
            f"| batch decode + crop ({device.type}, app.pixels), mixed sizes | batch {batch} | "
            f"{ms:.2f} ({ms / batch:.3f} per image) |"
        )
    if device.type == "cpu":
        import torch

        torch.set_num_threads(args.torch_threads or available_cores())
    variants = [("eager", False), ("graphs", True)] if device.type == "cuda" else [("", False)]
    for label, graphs in variants:
        active = load_active(
            Settings(),
            checkpoint,
            device,
            warmup_sizes=warmup_sizes(args.max_batch_size, device.type),
            precision=args.precision,
            cuda_graphs=graphs,
        )
        crop = np.zeros((args.crop, args.crop, 3), np.uint8)
        for batch in sorted({1, 8, args.max_batch_size}):
            ms = _median_ms(functools.partial(run_batch, active, [crop] * batch), 10 if device.type == "cpu" else 50)
            precision = "bf16" if active.bf16 else "fp32"
            lines.append(
                f"| forward {label}, {args.backbone} {args.crop}px ({device.type}, {precision}) | batch {batch} | "
                f"{ms:.2f} ({ms / batch:.3f} per image) |"
            )
    for line in lines[2:]:
        print("  " + line, flush=True)
    return lines


# --------------------------------------------------------------------------------------------------- the servers
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

    def start(self, ready_path: str | None = None) -> None:
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
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        if ready_path:
            wait_http(self.url + ready_path)

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
        self,
        name: str,
        port: int,
        checkpoint: str,
        args,
        max_batch_size: int,
        num_gpus: float,
        layout: str = "auto",
        cache: bool = False,
        overrides: dict[str, Any] | None = None,
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
                "cache_max_entries": 10_000 if cache else 0,  # off: the uploads repeat, and the model is measured
                "ingress_min_replicas": args.ingress_replicas,
                "ingress_max_replicas": args.ingress_replicas,
                "detector_min_replicas": args.replicas,
                "detector_max_replicas": args.replicas,
                "use_gpu": args.device == "cuda",
                "layout": layout,
                "champion_poll_s": 0,
                "torch_threads": args.torch_threads,
                "precision": args.precision,
                **(overrides or {}),
            },
        )
        self.app_args = AppArgs(autoscaling={})

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


@dataclass
class Cluster:
    """A local Ray cluster with Serve on a free port, on one of Serve's two data paths."""

    high_throughput: bool
    port: int = 0

    def start(self, args) -> dict[str, float]:
        from ray import serve

        from app.config import Settings
        from app.ray_runtime import init_ray

        # Ray starts its workers at nice 15 so they never starve the raylet; the baselines run at nice 0. On a
        # machine shared with other work that alone halves the service's share of the CPU, so for a like-for-like
        # comparison a local cluster's workers start at the baselines' priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Every target stays up while one is measured: logical CPUs enough to place them all (the cores are the cores).
        cpus = None if args.address else 4 * max(8, os.cpu_count() or 1)
        settings = Settings(
            ray_address=args.address, ray_num_cpus=cpus, serve={"high_throughput": self.high_throughput}
        )
        resources = init_ray(settings, include_dashboard=False, log_to_driver=False)
        self.port = free_port()
        serve.start(
            http_options={"host": "127.0.0.1", "port": self.port},
            logging_config={"log_level": "WARNING", "enable_access_log": False},
        )
        return resources

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


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
            text += f", {torch.cuda.device_count()} x GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return text


def table(cells: list[Cell]) -> str:
    lines = [
        "| target | c | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch | " + " | ".join(HOPS) + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(HOPS),
    ]
    for c in cells:
        batch = f"{c.mean_batch:.1f}" if c.mean_batch else "-"
        hops = " | ".join(f"{c.hops_ms[h]:.1f}" if h in c.hops_ms else "-" for h in HOPS)
        lines.append(
            f"| {c.target} | {c.concurrency} | {c.requests_per_s:.1f} | {c.p50_ms:.1f} | {c.p95_ms:.1f} | "
            f"{c.p99_ms:.1f} | {c.errors} | {batch} | {hops} |"
        )
    return "\n".join(lines)


def summary(cells: list[Cell], check: int) -> str:
    by = {(c.target, c.concurrency): c for c in cells}
    lines = []
    if ("batched", 1) in by:
        lines.append(f"single-request p50 (batched, c=1): {by['batched', 1].p50_ms:.1f} ms")
    if ("batched", check) in by:
        cell = by["batched", check]
        lines.append(f"batched at c={check}: {cell.requests_per_s:.1f} req/s, p99 {cell.p99_ms:.1f} ms")
    if ("cached", check) in by and ("batched", check) in by:
        ratio = by["cached", check].requests_per_s / max(by["batched", check].requests_per_s, 1e-9)
        lines.append(f"cached / batched at c={check}: {ratio:.2f}x, p50 {by['cached', check].p50_ms:.1f} ms")
    for base in ("noop", "plain", "unbatched", "split", "default"):
        if ("batched", check) in by and (base, check) in by:
            ratio = by["batched", check].requests_per_s / max(by[base, check].requests_per_s, 1e-9)
            name = "share of the node ceiling (noop)" if base == "noop" else f"batched / {base}"
            lines.append(f"{name} at c={check}: {ratio:.2f}" + ("" if base == "noop" else "x"))
    served = [c for c in cells if c.concurrency == check and base_target(c.target) in SERVE_TARGETS]
    if ("sized", check) in by and served:
        best = max(served, key=lambda c: c.requests_per_s)
        ratio = by["sized", check].requests_per_s / max(best.requests_per_s, 1e-9)
        lines.append(f"sized (no flags) / best ({best.target}) at c={check}: {ratio:.2f}")
    return "\n".join(lines)


def measure(pool, servers: dict[str, Any], names: list[str], bodies, args, samples, round_index: int) -> None:
    for concurrency in args.concurrencies:
        for target in names:
            server = servers[target]
            into = samples.setdefault((target, concurrency), Samples())
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
            batch = f"  mean batch {cell.mean_batch:.1f}" if cell.mean_batch else ""
            print(
                f"  round {round_index + 1} {target:>9} c={concurrency:<4} {cell.requests_per_s:8.1f} req/s  "
                f"p50 {cell.p50_ms:7.1f}  p99 {cell.p99_ms:7.1f} ms  errors {cell.errors}{batch}  {cell.hops_ms}",
                flush=True,
            )


def base_target(name: str) -> str:
    """The kind of a target: `colocated_gpu16` is a `colocated_gpu` of 16 replicas."""
    return "colocated_gpu" if re.fullmatch(r"colocated_gpu\d*", name) else name


def colocated_replicas(name: str, args) -> int:
    digits = name.removeprefix("colocated_gpu").removeprefix("colocated_cpu")
    return int(digits) if digits else args.ingress_replicas


def start_serve_targets(names, checkpoint, args, cluster: Cluster, resources) -> dict[str, ServeTarget]:
    # Every target stays up while the others are measured; on one GPU the applications share it.
    gpus = resources.get("GPU", 0) / (len(names) * args.replicas) if args.device == "cuda" else 0.0
    started = {}
    for name in names:
        batch = 1 if name == "unbatched" else args.max_batch_size
        layout = LAYOUTS.get(base_target(name), "auto")
        if name == "batched" and args.device == "cuda":
            layout = "split"  # the GPU layout of the earlier measurements; colocated and sized are the new one
        share, overrides = min(gpus, 1.0), _target_overrides(name, args, resources)
        if base_target(name) in ("colocated_gpu", "colocated_cpu"):
            share = min(gpus, 1.0) / colocated_replicas(name, args)
        if name == "sized":  # its replicas share the target's part of the GPU as `aipd serve` shares a card
            batch = overrides["max_batch_size"]
            share = min(gpus, 1.0) * overrides["gpus_per_replica"]
        started[name] = ServeTarget(
            name, cluster.port, checkpoint, args, batch, share, layout, cache=name == "cached", overrides=overrides
        )
        started[name].start()
    return started


def _target_overrides(name: str, args, resources: dict[str, float]) -> dict[str, Any]:
    """What a target sets beyond the command line's values (see the module docstring)."""
    if name == "ingress_decode":
        return {"decode_on": "ingress"}
    if base_target(name) in ("colocated_gpu", "colocated_cpu"):
        replicas = colocated_replicas(name, args)
        decode_on = "detector" if base_target(name) == "colocated_gpu" else "ingress"
        return {"decode_on": decode_on, "detector_min_replicas": replicas, "detector_max_replicas": replicas}
    if name == "sized":
        from app.config import Settings
        from serving.config import sized_for_node

        # What `aipd serve` sizes from: the node's own cluster, not the benchmark's wider one.
        cpus = resources.get("CPU", 0.0) if args.address else float(Settings().local_num_cpus)
        gpus = resources.get("GPU", 0.0) if args.device == "cuda" else 0.0
        serve = sized_for_node(Settings(), cpus, gpus).serve
        fields = (
            "ingress_min_replicas",
            "ingress_max_replicas",
            "max_batch_size",
            "detector_min_replicas",
            "detector_max_replicas",
            "gpus_per_replica",
        )
        return {field: getattr(serve, field) for field in fields}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--targets", default="hops,noop,plain,unbatched,batched,default")
    parser.add_argument("--concurrency", default="1,8,32,64,128")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds run before each cell's window")
    parser.add_argument(
        "--rounds", type=int, default=1, help="passes over all cells, targets interleaved; samples are pooled"
    )
    parser.add_argument("--replicas", type=int, default=1, help="detector replicas (one GPU each on cuda)")
    parser.add_argument("--ingress-replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0)
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
    args = parser.parse_args()
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]

    os.environ.update(DETECTOR_ENV)  # before torch loads OpenMP: the hop profile runs in this process
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    jpegs = make_jpegs(sizes, per_size=8)
    bodies = [multipart(jpeg) for jpeg in jpegs]
    mean_kib = np.mean([len(b) for b in bodies]) / 1024
    print(f"machine: {machine()}; uploads: {len(bodies)} JPEGs, mean {mean_kib:.0f} KiB", flush=True)

    import multiprocessing

    from app.model import ModelConfig, PreprocessSettings, build_model, save_checkpoint

    workdir = Path(tempfile.mkdtemp(prefix="aipd-serve-load-"))
    checkpoint = str(workdir / "checkpoint")
    cfg = ModelConfig(backbone=args.backbone)
    save_checkpoint(checkpoint, build_model(cfg), cfg, PreprocessSettings(crop_size=args.crop))

    hops = profile_hops(checkpoint, jpegs, sizes, args) if "hops" in targets else []
    servers: dict[str, Any] = {}
    samples: dict[tuple[str, int], Samples] = {}
    with multiprocessing.get_context("spawn").Pool(args.client_procs) as pool:
        try:
            if "noop" in targets:
                servers["noop"] = Subprocess(["--noop", "--workers", str(args.client_procs)])
                servers["noop"].start()
            if "plain" in targets:
                servers["plain"] = Subprocess(
                    ["--checkpoint", checkpoint, "--device", args.device, "--precision", args.precision]
                )
                servers["plain"].start("/health")
            serve_names = [t for t in targets if base_target(t) in SERVE_TARGETS]
            cluster = None
            if serve_names:
                cluster = Cluster(high_throughput=True)
                servers.update(start_serve_targets(serve_names, checkpoint, args, cluster, cluster.start(args)))
            names = sorted(servers, key=lambda t: (ORDER.index(base_target(t)), t))
            for round_index in range(args.rounds):
                measure(pool, servers, names, bodies, args, samples, round_index)
            if cluster is not None:
                for name in serve_names:
                    servers.pop(name).stop()
                cluster.stop()
            if "default" in targets:  # Serve's default data path needs a cluster of its own
                cluster = Cluster(high_throughput=False)
                resources = cluster.start(args)
                servers["default"] = start_serve_targets(["batched"], checkpoint, args, cluster, resources)["batched"]
                for round_index in range(args.rounds):
                    measure(pool, servers, ["default"], bodies, args, samples, round_index)
                servers.pop("default").stop()
                cluster.stop()
        finally:
            for server in servers.values():
                server.stop()
    keys = sorted(samples, key=lambda k: (ORDER.index(base_target(k[0])), k[0], k[1]))
    cells = [samples[key].cell(*key) for key in keys]

    print(f"\nmachine: {machine()}\n")
    if hops:
        print("\n".join(hops) + "\n")
    print(table(cells))
    print()
    print(summary(cells, args.check_at))
    if args.json_out:
        report = {
            "machine": machine(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "hops": hops,
            "cells": [asdict(c) for c in cells],
        }
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
