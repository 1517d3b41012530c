"""`aipd serve`, `aipd predict` and `aipd scan`: the serving stage's commands.

Ray, torch and the deployments are imported inside the commands, so `aipd --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, get_args

import typer

from app.cli_common import (
    AddressOpt,
    ConfigOpt,
    catch_stop_signals,
    console,
    handle_errors,
    ignore_stop_signals,
    new_app,
    settings_from,
    warn,
)
from app.config import Precision, Settings, reachable_url
from app.contract import API_KEY_HEADER

cli = new_app()


@cli.command("serve")
@handle_errors
def serve_command(
    model_uri: Optional[str] = typer.Option(
        None,
        "--model-uri",
        "-m",
        help="models:/NAME@ALIAS (followed when the alias moves), models:/NAME/VERSION or a checkpoint "
        "directory. Default: models:/aipd-detector@champion.",
    ),
    host: Optional[str] = typer.Option(None, "--host", help="HTTP host (0.0.0.0 to listen on every interface)."),
    port: Optional[int] = typer.Option(None, "--port", help="HTTP port.", min=1, max=65535),
    replicas: Optional[int] = typer.Option(
        None, "--replicas", help="A fixed number of detector replicas (sets both bounds).", min=1
    ),
    min_replicas: Optional[int] = typer.Option(None, "--min-replicas", help="Detector autoscaling lower bound.", min=0),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", help="Detector autoscaling upper bound.", min=1),
    ingress_replicas: Optional[int] = typer.Option(
        None, "--ingress-max-replicas", help="Ingress autoscaling upper bound (decoding runs there).", min=1
    ),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="Images per forward pass.", min=1),
    batch_wait_ms: Optional[float] = typer.Option(
        None, "--batch-wait-ms", help="How long a batch waits to fill, in milliseconds.", min=0
    ),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="auto (bf16 on GPU, float32 on CPU; the default), fp32 or bf16 (pays on AMX CPUs)."
    ),
    champion_poll_s: Optional[float] = typer.Option(
        None, "--champion-poll-s", help="How often an alias model URI is re-resolved (0: never; default 10).", min=0
    ),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster address; the app is deployed there and the command returns."
    ),
    write_config: Optional[Path] = typer.Option(
        None, "--write-config", help="Where to write the Serve config YAML (default: <work_dir>/serve_config.yaml)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write the config file and exit without serving."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="Default: a GPU when the cluster has one."),
    ray_metrics_port: Optional[int] = typer.Option(
        None, "--ray-metrics-port", help="Port of Ray's own Prometheus metrics (ray_serve_*), local cluster only."
    ),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Serve the detector over HTTP with Ray Serve: batched, autoscaled, following the champion model.

    Writes the standard Ray Serve config file for these settings (usable with `serve run` / `serve deploy`),
    then deploys it. The API: POST /predict, /predict/batch, /predict/explain; GET /health, /metrics, /docs.

    Examples:
      aipd serve
      aipd serve --model-uri .aipd/checkpoints/best --port 8080
      aipd serve --host 0.0.0.0 --min-replicas 1 --max-replicas 4 --max-batch-size 64
      aipd serve --address ray://head:10001 --model-uri models:/aipd-detector/3
      aipd serve --write-config serving/serve_config.yaml --dry-run
    """
    from serving.config import AppArgs, serve_config, write_serve_config

    if replicas is not None:
        min_replicas = max_replicas = replicas
    serve_overrides = {
        "model_uri": model_uri,
        "host": host,
        "port": port,
        "detector_min_replicas": min_replicas,
        "detector_max_replicas": max_replicas,
        "ingress_max_replicas": ingress_replicas,
        "max_batch_size": max_batch_size,
        "batch_wait_timeout_s": None if batch_wait_ms is None else batch_wait_ms / 1000.0,
        "champion_poll_s": champion_poll_s,
        "precision": precision,
        "use_gpu": gpu,
    }
    if precision not in (None, *get_args(Precision)):
        raise typer.BadParameter("choose auto, fp32 or bf16", param_hint="--precision")
    settings = settings_from(config, ray_address=address, serve=serve_overrides)
    args = AppArgs()
    target = write_config or settings.work_dir / "serve_config.yaml"
    if dry_run:
        path = write_serve_config(target, serve_config(settings, args))
        console.print(f"Serve config written to {path} (works with `serve run` / `serve deploy`)")
        return
    _check_model(settings)
    with _cluster(settings, ray_metrics_port) as gpus:
        settings = _sized(settings)
        gpus = _gpus(settings) if gpus else 0.0  # sizing may have given each replica a share of a card
        path = write_serve_config(target, serve_config(settings, args, gpus))
        console.print(f"Serve config written to {path} (works with `serve run` / `serve deploy`)")
        _deploy_and_wait(settings, args, ray_metrics_port)


@cli.command("predict")
@handle_errors
def predict_command(
    images: list[Path] = typer.Argument(..., help="Image files (JPEG, PNG or WebP)."),
    url: Optional[str] = typer.Option(None, "--url", help="Service URL (default: from the serve settings)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object per file) instead of a table."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", help=f"{API_KEY_HEADER} to send (default: the first of AIPD_API_KEYS, if any)."
    ),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for an answer.", min=0.1),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Ask a running service (`aipd serve`) whether photos are AI-generated, and print a table of verdicts.

    Exit code 1 when any file was refused (not an image, too large, ...).

    Examples:
      aipd predict photo.jpg
      aipd predict shop/*.jpg --url http://detector.internal:8000 --api-key $KEY
      aipd predict a.png b.webp --json
    """
    from app.client import predict_files

    settings = settings_from(config)
    target = url or settings.service_url
    key = api_key or (settings.api_keys[0] if settings.api_keys else None)
    results = predict_files(target, images, api_key=key, timeout_s=timeout)
    if as_json:
        for item in results:
            print(json.dumps(item))
    else:
        console.print(_table(results, target))
    if any("error" in item for item in results):
        raise typer.Exit(1)


@cli.command("scan")
@handle_errors
def scan_command(
    sources: list[str] = typer.Argument(
        ..., help="Folders (scanned recursively), CSV/Parquet manifests with a `path` column, or URIs (s3://...)."
    ),
    out: str = typer.Option(..., "--out", "-o", help="Output folder or URI: Parquet files, one row per input file."),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="models:/aipd-detector@champion (default), models:/NAME/VERSION or a checkpoint dir.",
    ),
    rescan: bool = typer.Option(False, "--rescan", help="Scan every file again, even those already in the output."),
    report: bool = typer.Option(False, "--report", help="Write report.html next to the output."),
    top: int = typer.Option(24, "--top", min=1, help="Suspicious photos the report shows."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1, help="Images per forward pass (default: 256 on a GPU, 16 on a CPU)."
    ),
    concurrency: Optional[str] = typer.Option(
        None, "--concurrency", help="MIN,MAX model actors (default: 1,GPUs on a GPU cluster, 1,1 on CPUs)."
    ),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="Default: GPUs when the cluster has them."),
    address: Optional[str] = AddressOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Scan a whole catalog with Ray Data batch inference: which stored photos are AI-generated?

    Reads and decodes on CPU tasks, runs the detector in a pool of model actors (a GPU each when there are GPUs),
    writes one Parquet row per file: path, prediction, probability, confidence, threshold, model_version, width,
    height, bytes, sha256, error, detail. Files that cannot be read are rows with an error, never fatal. Run it again
    with the same --out and it skips the files already there.

    Examples:
      aipd scan photos/ --out scans/photos --report
      aipd scan s3://shop/catalog/ --out s3://shop/scans/2026-11 --model models:/aipd-detector/7
      aipd scan manifest.csv --out scans/m --address ray://head:10001
    """
    from serving.scan import run_scan

    bounds = _concurrency(concurrency)
    settings = settings_from(config, ray_address=address, serve={"use_gpu": gpu})
    summary = run_scan(
        settings, sources, out, model_uri=model, rescan=rescan, batch_size=batch_size, concurrency=bounds
    )
    if report:
        from serving.scan_report import write_report

        summary.report = write_report(out, top=top)
    console.print(_scan_table(summary))


def _concurrency(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        low, _, high = text.partition(",")
        bounds = (int(low), int(high or low))
    except ValueError:
        raise typer.BadParameter("give MIN,MAX, e.g. 1,4", param_hint="--concurrency") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise typer.BadParameter("needs 1 <= MIN <= MAX", param_hint="--concurrency")
    return bounds


def _scan_table(summary: Any) -> Any:
    from rich.table import Table

    table = Table(title="catalog scan", show_header=False)
    scored = summary.files - summary.errors
    table.add_row("files", f"{summary.files:,} ({summary.scanned:,} scanned now, {summary.skipped:,} already done)")
    table.add_row("speed", f"{summary.images_per_s:,.1f} images/s ({summary.seconds:.1f} s)")
    share = summary.ai_generated / scored if scored > 0 else 0.0
    table.add_row("AI-generated", f"{summary.ai_generated:,} ({share:.1%} of the photos scanned)")
    errors = ", ".join(f"{kind} {n}" for kind, n in summary.error_kinds.items())
    table.add_row("could not scan", f"{summary.errors:,}" + (f" ({errors})" if errors else ""))
    table.add_row("model", summary.model_version)
    table.add_row("output", summary.out)
    if summary.report:
        table.add_row("report", summary.report)
    return table


def _table(results: list[dict[str, Any]], url: str) -> Any:
    from rich.table import Table

    table = Table(title=f"verdicts from {url}")
    for column, justify in [
        ("file", "left"),
        ("verdict", "left"),
        ("probability", "right"),
        ("confidence", "left"),
        ("model", "left"),
        ("ms", "right"),
    ]:
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for item in results:
        if "error" in item:
            table.add_row(item["file"], f"[red]{item['error']}[/red]", "", item.get("detail", ""), "", "")
            continue
        colour = "magenta" if item["prediction"] == "ai_generated" else "green"
        table.add_row(
            item["file"],
            f"[{colour}]{item['prediction']}[/{colour}]",
            f"{item['probability']:.3f}",
            item["confidence"],
            str(item["model_version"]),
            f"{item['inference_time_ms']:.1f}",
        )
    return table


def _check_model(settings: Settings) -> None:
    """Fail in one line before anything starts on a wrong checkpoint path, a registered version that does not exist
    or a registry that does not answer; only warn when the alias has no model yet (503 until one is registered)."""
    from app.model_ref import parse_model_ref
    from app.registry import RegistryError, get_alias_version, registry_version, resolve_model, setup_mlflow

    ref = parse_model_ref(settings.default_model_uri)
    if ref.kind == "path":
        resolve_model(settings, ref.uri)
    if not ref.in_registry:
        return
    setup_mlflow(settings)  # an unreachable MLflow server fails here, in seconds
    if ref.kind == "version":
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            MlflowClient().get_model_version(ref.name, registry_version(ref))
        except MlflowException as err:
            raise RegistryError(f"{ref.uri} is not a registered model version ({err.error_code})") from err
        return
    found = get_alias_version(settings.model_copy(update={"registered_model": ref.name}), ref.alias)
    if found is None:
        warn(
            f"no model under {ref.uri} yet: the service answers 503 until one is registered (`aipd train`), "
            "then picks it up without a restart"
        )


@contextlib.contextmanager
def _cluster(settings: Settings, ray_metrics_port: int | None) -> Iterator[float]:
    """The cluster the service runs on; yields the GPUs a detector replica gets there (they decide the layout).

    A cluster named by --address keeps the application after this command. Otherwise the command owns a local
    cluster in a session of its own: before it starts, what killed runs left behind is stopped and a port that is
    taken is named; on Ctrl-C, SIGTERM or SIGHUP the service drains, then Serve, Ray and everything of the cluster
    stop, and the command exits 130, 143 or 129.
    """
    from app.ray_runtime import init_ray, start_local_cluster
    from serving.config import APP_NAME
    from serving.lifecycle import clear_leftovers, drain_and_stop, require_free_port

    if settings.ray_address:
        init_ray(settings, include_dashboard=False)
        yield _gpus(settings)
        return
    for line in clear_leftovers():
        warn(line)
    require_free_port(settings.serve.host, settings.serve.port)
    # a retraining job is submitted through the dashboard's job API, so a service that retrains on drift runs one
    retrains = bool(settings.serve.retrain_data)
    owned = start_local_cluster(settings, include_dashboard=retrains, metrics_port=ray_metrics_port)
    catch_stop_signals()  # once Ray is up: its native SIGTERM handler would end the process with a stack dump
    try:
        yield _gpus(settings)
    finally:
        import ray

        ignore_stop_signals()
        console.print("stopping: draining the service, then Serve and the local Ray cluster")
        started = time.perf_counter()
        try:
            drain_and_stop(APP_NAME)
        finally:
            ray.shutdown()
            owned.stop()
        console.print(f"stopped in {time.perf_counter() - started:.1f} s")


def _sized(settings: Settings) -> Settings:
    """The settings sized for the cluster the service runs on (serving.config.sized_for_node)."""
    import ray

    from serving.config import detector_gpus, sized_for_node

    totals = ray.cluster_resources()
    gpus = float(totals.get("GPU", 0.0)) if detector_gpus(settings) else 0.0
    return sized_for_node(settings, float(totals.get("CPU", 0.0)), gpus)


def _gpus(settings: Settings) -> float:
    """The GPUs a detector replica gets; a GPU asked for (`serve.use_gpu`) on a cluster without one is an error now,
    not a replica that waits for ever."""
    from app.errors import UserError
    from app.ray_runtime import cluster_has_gpus
    from serving.config import detector_gpus

    if settings.serve.use_gpu and not cluster_has_gpus():
        raise UserError(
            "a GPU was asked for (--gpu, serve.use_gpu) but the Ray cluster has none; serve without it or on a "
            "cluster with GPUs (--address)"
        )
    return detector_gpus(settings)


def _deploy_and_wait(settings: Settings, args: Any, ray_metrics_port: int | None) -> None:
    from ray import serve

    from serving.app_builder import build_application
    from serving.config import APP_NAME
    from serving.deploy import run_app

    # Replicas may run in another directory (or on another machine): pin the work directory to an absolute path.
    deployed = settings.model_copy(update={"work_dir": settings.work_dir.resolve()})
    serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
    started = time.perf_counter()
    run_app(build_application(deployed, args), APP_NAME)
    base = settings.service_url
    console.print(f"serving {settings.default_model_uri} at {base} (ready in {time.perf_counter() - started:.1f} s)")
    console.print(f"  try: curl -F file=@photo.jpg {base}/predict    docs: {base}/docs    metrics: {base}/metrics")
    if ray_metrics_port and not settings.ray_address:
        console.print(f"  Ray Serve's own metrics: {reachable_url(settings.serve.host, ray_metrics_port)}/metrics")
    if not settings.api_keys and settings.serve.rate_limit_per_minute and settings.serve.high_throughput:
        from serving.ingress import LIMIT_NEEDS_KEYS

        warn(LIMIT_NEEDS_KEYS)
    if settings.ray_address:
        console.print("deployed to the cluster; it keeps serving after this command exits (`serve status` to check)")
        return
    console.print("press Ctrl-C to stop")
    while True:
        time.sleep(1.0)
