"""Soak: the service at a steady share of its capacity for a long time, to see whether anything leaks.

First a short closed-loop ramp (1, 2, 4, ... clients, --ramp-step seconds each, until two doublings in a row gain under
10%) measures the capacity; then an open loop sends requests at --fraction of it, evenly spaced, for --duration
seconds. Every --interval seconds it samples: requests/s answered, p50 and p99 latency, errors, the resident memory
(RSS) of every process of the service (each Serve replica of the application, its metrics store, the Serve controller,
the proxy and HAProxy with its haproxy child) and the Ray object store's use. It writes soak.csv, soak.png and
summary.txt to --out, prints the summary, and exits 1 when any request failed or the service's memory (the sum of
those RSS) grew more than --max-growth after the warm-up (the first --warmup seconds of the steady phase, where caches
and allocators fill), comparing the medians of the first and the last three samples after it.

RSS is read from /proc on this machine: run it where the service runs (one node; its head node for a cluster).

    This machine, its own local cluster and service (an untrained EfficientNet-B0 at 224 px, the layout `aipd serve`
    picks), 10 minutes:
        python benchmarks/soak.py --out /tmp/soak
    A service already running (aipd serve) on a Ray cluster, for an hour:
        python benchmarks/soak.py --url http://127.0.0.1:8000 --app aipd --address 127.0.0.1:6379 --duration 3600 \\
            --out soak/
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages come from this checkout

from benchmarks.serve_load import BOUNDARY, Cluster, ServeTarget, machine, make_jpegs, multipart  # noqa: E402

RAMP_CLIENTS = (1, 2, 4, 8, 16, 32, 64)
SERVE_ACTORS = ("ServeController", "ProxyActor", "HAProxyManager")


@dataclass
class Answer:
    ended: float  # time.monotonic()
    latency_s: float
    ok: bool


@dataclass
class Sample:
    t_s: float  # seconds since the steady phase started
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    object_store_mb: float
    rss_mb: dict[str, float] = field(default_factory=dict)  # process label -> RSS

    @property
    def rss_total_mb(self) -> float:
        return sum(self.rss_mb.values())


# ---------------------------------------------------------------------------------------------------------- load
async def _post(session: Any, url: str, body: bytes, answers: list[Answer]) -> None:
    import aiohttp

    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    sent = time.monotonic()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            ok = response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        ok = False
    ended = time.monotonic()
    answers.append(Answer(ended, ended - sent, ok))


def _session() -> Any:
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60))


async def _closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float) -> list[Answer]:
    answers: list[Answer] = []
    stop_at = time.monotonic() + seconds

    async def client(index: int) -> None:
        n = index
        while time.monotonic() < stop_at:
            await _post(session, url, bodies[n % len(bodies)], answers)
            n += clients

    async with _session() as session:
        await asyncio.gather(*(client(i) for i in range(clients)))
    return answers


async def _open_loop(url: str, bodies: list[bytes], rate: float, stop: threading.Event, answers: list[Answer]) -> None:
    """Requests at `rate` per second, evenly spaced, whatever the answers take (a real service's arrivals do not
    wait for it), until `stop` is set; then waits for those in flight."""
    pending: set[asyncio.Task] = set()
    async with _session() as session:
        next_at, n = time.monotonic(), 0
        while not stop.is_set():
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            task = asyncio.create_task(_post(session, url, bodies[n % len(bodies)], answers))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
            next_at += 1.0 / rate
        await asyncio.gather(*pending)


def measure_capacity(url: str, bodies: list[bytes], step_s: float) -> tuple[float, int, list[str]]:
    """(requests/s at the best closed-loop concurrency, requests failed, one line per step). The ramp stops once two
    doublings in a row gain under 10%: batching can make a step after a flat one pay again."""
    best, flat, errors, lines = 0.0, 0, 0, []
    for clients in RAMP_CLIENTS:
        answers = asyncio.run(_closed_loop(url, bodies, clients, step_s))
        rate = sum(a.ok for a in answers) / step_s
        errors += sum(not a.ok for a in answers)
        lines.append(f"ramp: {clients:3d} clients  {rate:7.1f} req/s  errors {sum(not a.ok for a in answers)}")
        print(lines[-1], flush=True)
        flat = flat + 1 if rate < best * 1.1 else 0
        best = max(best, rate)
        if flat == 2:
            break
    return best, errors, lines


# ------------------------------------------------------------------------------------------------------- samples
def service_processes(app: str) -> dict[str, int]:
    """label -> pid of the application's processes in the connected Ray cluster (the GCS's actor table: never another
    cluster's), with HAProxy's own haproxy children."""
    from ray._private.state import actors

    from serving.metrics import store_name

    found: dict[str, int] = {}
    for actor in actors(actor_state_name="ALIVE").values():
        name, pid = actor["ActorClassName"], actor["Pid"]
        if name in SERVE_ACTORS or name.startswith(f"ServeReplica:{app}:") or actor["Name"] == store_name(app):
            found[f"{name.removeprefix(f'ServeReplica:{app}:')}-{pid}"] = pid
            if name == "HAProxyManager":
                found.update({f"haproxy-{child}": child for child in _children(pid, b"haproxy")})
    return found


def _children(parent: int, command: bytes) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and command in (entry / "cmdline").read_bytes():
                children.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return children


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def object_store_mb() -> float:
    """Bytes in the Ray object store over the cluster (what `ray memory --stats-only` reports)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return reply.store_stats.object_store_bytes_used / 2**20


def take_sample(app: str, t_s: float, window: list[Answer], seconds: float) -> Sample:
    latencies = np.array([a.latency_s for a in window if a.ok]) * 1000.0
    p50, p99 = (float(np.percentile(latencies, q)) if latencies.size else float("nan") for q in (50, 99))
    memory = {label: rss_mb(pid) for label, pid in service_processes(app).items()}
    return Sample(
        t_s=t_s,
        requests_per_s=sum(a.ok for a in window) / seconds,
        p50_ms=p50,
        p99_ms=p99,
        errors=sum(not a.ok for a in window),
        object_store_mb=object_store_mb(),
        rss_mb={label: value for label, value in memory.items() if value is not None},
    )


def soak(url: str, app: str, bodies: list[bytes], rate: float, duration_s: float, interval_s: float) -> list[Sample]:
    """The steady phase: an open loop at `rate` in a background thread, a sample every `interval_s` seconds."""
    answers: list[Answer] = []
    stop = threading.Event()
    loop = threading.Thread(target=lambda: asyncio.run(_open_loop(url, bodies, rate, stop, answers)), daemon=True)
    samples: list[Sample] = []
    started = time.monotonic()
    loop.start()
    seen = 0
    try:
        for tick in range(1, int(duration_s // interval_s) + 1):
            time.sleep(max(0.0, started + tick * interval_s - time.monotonic()))
            window, seen = answers[seen:], len(answers)
            samples.append(take_sample(app, tick * interval_s, window, interval_s))
            s = samples[-1]
            print(
                f"{s.t_s:6.0f} s  {s.requests_per_s:6.1f} req/s  p50 {s.p50_ms:6.1f}  p99 {s.p99_ms:6.1f} ms  "
                f"errors {s.errors}  RSS {s.rss_total_mb:7.1f} MB  object store {s.object_store_mb:.1f} MB",
                flush=True,
            )
    finally:
        stop.set()
        loop.join(timeout=120)
    late = answers[seen:]  # answered after the last sample: their errors count too
    if samples and late:
        samples[-1].errors += sum(not a.ok for a in late)
    return samples


# -------------------------------------------------------------------------------------------------------- verdict
def memory_growth(samples: list[Sample], warmup_s: float) -> tuple[float, float] | None:
    """(MB just after the warm-up, MB at the end): medians of the first and the last three samples of the steady
    phase, so that one sample caught in a passing burst neither hides nor fakes a trend; None when too short."""
    steady = [s.rss_total_mb for s in samples if s.t_s >= warmup_s]
    if len(steady) < 2:
        return None
    return float(np.median(steady[:3])), float(np.median(steady[-3:]))


def problems(samples: list[Sample], ramp_errors: int, warmup_s: float, max_growth: float) -> list[str]:
    """Why the soak fails: any error, or the service's memory grown by more than `max_growth` after the warm-up."""
    found = []
    errors = ramp_errors + sum(s.errors for s in samples)
    if errors:
        found.append(f"{errors} requests failed ({ramp_errors} of them during the capacity ramp)")
    growth = memory_growth(samples, warmup_s)
    if growth is not None and growth[1] > growth[0] * (1.0 + max_growth):
        found.append(f"memory grew from {growth[0]:.0f} MB to {growth[1]:.0f} MB after the warm-up")
    return found


def summary(samples: list[Sample], warmup_s: float, capacity: float, rate: float) -> list[str]:
    steady = [s for s in samples if s.t_s >= warmup_s] or samples
    first, last = steady[0], steady[-1]
    before, after = memory_growth(samples, warmup_s) or (first.rss_total_mb, last.rss_total_mb)
    lines = [
        f"machine: {machine()}",
        f"capacity {capacity:.1f} req/s (closed-loop ramp); steady load {rate:.1f} req/s for {samples[-1].t_s:.0f} s",
        f"answered {np.mean([s.requests_per_s for s in samples]):.1f} req/s on average; "
        f"p50 {np.median([s.p50_ms for s in samples]):.1f} ms, worst p99 {max(s.p99_ms for s in samples):.1f} ms; "
        f"errors {sum(s.errors for s in samples)}",
        f"service RSS after warm-up {before:.0f} MB, at the end {after:.0f} MB ({after / before - 1.0:+.1%}; medians "
        f"of three samples); object store {first.object_store_mb:.1f} -> {last.object_store_mb:.1f} MB",
        f"per process, {first.t_s:.0f} s -> {last.t_s:.0f} s:",
    ]
    for label in sorted(set(first.rss_mb) & set(last.rss_mb)):
        before, after = first.rss_mb[label], last.rss_mb[label]
        lines.append(f"  {label}: {before:.0f} -> {after:.0f} MB ({after / before - 1.0:+.1%})")
    gone = sorted(set(samples[0].rss_mb) - set(last.rss_mb))
    if gone:
        lines.append(f"  processes that went away during the soak: {', '.join(gone)}")
    return lines


# ---------------------------------------------------------------------------------------------------------- files
def write_csv(samples: list[Sample], path: Path) -> None:
    labels = sorted({label for s in samples for label in s.rss_mb})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        head = ["t_s", "requests_per_s", "p50_ms", "p99_ms", "errors", "object_store_mb", "rss_total_mb"]
        writer.writerow(head + [f"rss_mb:{label}" for label in labels])
        for s in samples:
            values = [s.t_s, s.requests_per_s, s.p50_ms, s.p99_ms, s.errors, s.object_store_mb, s.rss_total_mb]
            rss = [s.rss_mb.get(label, "") for label in labels]
            writer.writerow([f"{v:.3f}" if isinstance(v, float) else v for v in values + rss])


def write_plot(samples: list[Sample], warmup_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.t_s / 60.0 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    axes[0].plot(minutes, [s.requests_per_s for s in samples], "o-", label="answered")
    axes[0].bar(minutes, [s.errors for s in samples], width=0.05, color="red", label="errors")
    axes[0].set(ylabel="requests/s")
    axes[1].plot(minutes, [s.p50_ms for s in samples], "o-", label="p50")
    axes[1].plot(minutes, [s.p99_ms for s in samples], "o-", label="p99")
    axes[1].set(ylabel="latency (ms)")
    axes[2].plot(minutes, [s.rss_total_mb for s in samples], "k-", linewidth=2, label="total")
    for label in sorted({label for s in samples for label in s.rss_mb}):
        axes[2].plot(minutes, [s.rss_mb.get(label, np.nan) for s in samples], linewidth=0.8, label=label)
    axes[2].set(ylabel="RSS (MB)")
    axes[3].plot(minutes, [s.object_store_mb for s in samples], "o-")
    axes[3].set(ylabel="object store (MB)", xlabel="minutes of steady load")
    for ax in axes:
        ax.axvline(warmup_s / 60.0, color="grey", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
    for ax in axes[:3]:
        ax.legend(fontsize=7, loc="lower left", ncol=3)
    fig.suptitle("soak: steady load after the capacity ramp (dashed: end of warm-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of steady load (default 10 minutes)")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of the measured capacity to send")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, help="seconds of the steady phase before memory is compared (20%%)")
    parser.add_argument("--max-growth", type=float, default=0.10, help="memory growth after warm-up that fails")
    parser.add_argument("--ramp-step", type=float, default=5.0, help="seconds per concurrency of the capacity ramp")
    parser.add_argument("--out", type=Path, required=True, help="folder for soak.csv and soak.png")
    parser.add_argument("--url", help="a running service (default: start one on a local cluster)")
    parser.add_argument("--app", default="soak", help="its Serve application name (default: soak)")
    parser.add_argument("--address", help="the Ray cluster it runs on (default: RAY_ADDRESS, else a local one)")
    parser.add_argument("--sizes", default="320x240,640x480", help="JPEG sizes of the uploads, mixed")
    # the service this script starts when no --url is given
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--layout", choices=["auto", "split", "colocated"], default="auto")
    parser.add_argument("--replicas", type=int, default=1, help="detector replicas")
    parser.add_argument("--ingress-replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(args.interval, 0.2 * args.duration)
    return args


def _start_service(args: argparse.Namespace) -> tuple[Cluster, ServeTarget]:
    """A local cluster on Serve's high-throughput path and the application as `aipd serve` deploys it."""
    from app.model import ModelConfig, PreprocessSettings, build_model, save_checkpoint

    checkpoint = str(Path(tempfile.mkdtemp(prefix="aipd-soak-")) / "checkpoint")
    cfg = ModelConfig(backbone=args.backbone)
    save_checkpoint(checkpoint, build_model(cfg), cfg, PreprocessSettings(crop_size=args.crop))
    cluster = Cluster(high_throughput=True)
    resources = cluster.start(args)
    gpus = 1.0 if args.device == "cuda" and resources.get("GPU", 0) >= 1 else 0.0
    target = ServeTarget(args.app, cluster.port, checkpoint, args, args.max_batch_size, gpus, args.layout)
    target.start()
    return cluster, target


def _connect(address: str | None) -> None:
    """Join the cluster a running service is on (its processes are found in that cluster's actor table)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SystemExit("--url needs --address (or RAY_ADDRESS): the Ray cluster the service runs on")
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")


def main(argv: list[str] | None = None) -> int:
    """0 when the soak passed; 1 when a request failed or memory grew (the summary says which)."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cluster = target = None
    if args.url is None:
        cluster, target = _start_service(args)
        url = target.url
    else:
        _connect(args.address)
        url = args.url.rstrip("/")
    try:
        sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
        bodies = [multipart(data) for data in make_jpegs(sizes, per_size=4)]
        capacity, ramp_errors, ramp = measure_capacity(url + "/predict", bodies, args.ramp_step)
        rate = args.fraction * capacity
        print(f"capacity {capacity:.1f} req/s; soaking at {rate:.1f} req/s for {args.duration:.0f} s", flush=True)
        samples = soak(url + "/predict", args.app, bodies, rate, args.duration, args.interval)
    finally:
        if target is not None and cluster is not None:
            target.stop()
            cluster.stop()
    write_csv(samples, args.out / "soak.csv")
    write_plot(samples, args.warmup, args.out / "soak.png")
    found = problems(samples, ramp_errors, args.warmup, args.max_growth)
    lines = summary(samples, args.warmup, capacity, rate)
    lines.append("verdict: " + ("; ".join(found) if found else "passed (no error, no memory growth past the limit)"))
    print("\n".join(lines), flush=True)
    (args.out / "summary.txt").write_text("\n".join(ramp + lines) + "\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
