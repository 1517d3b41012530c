"""`aipd ui`: the Streamlit page in front of a running detector API."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from app.cli_common import (
    ConfigOpt,
    catch_stop_signals,
    console,
    fail,
    handle_errors,
    ignore_stop_signals,
    new_app,
    settings_from,
    warn,
)
from app.contract import API_KEY_HEADER

cli = new_app()


@cli.command("ui")
@handle_errors
def ui_command(
    api_url: Optional[str] = typer.Option(
        None, "--api-url", help="The detector API (default: AIPD_UI__API_URL, else the `aipd serve` address)."
    ),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        help=f"{API_KEY_HEADER} to send (default: AIPD_UI__API_KEY, else the first of AIPD_API_KEYS).",
    ),
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port of the page (default 8501).", min=1, max=65535),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Open the web page: drop product photos, see verdicts, probabilities and Grad-CAM heatmaps.

    The page talks to the HTTP API only, so start the service first (`aipd serve`) or point it at one.
    Dashboard links in its side panel come from AIPD_UI__RAY_DASHBOARD_URL, AIPD_UI__MLFLOW_URL and
    AIPD_UI__GRAFANA_URL. Stops with Ctrl-C.

    Examples:
      aipd ui
      aipd ui --port 8600 --api-url http://detector.internal:8000 --api-key $KEY
      AIPD_UI__GRAFANA_URL=http://127.0.0.1:3000 aipd ui --host 0.0.0.0
    """
    from app.client import ApiClient, ServiceError, api_url_of
    from ui.launch import start_ui, stop_ui, wait_until_up
    from ui.results import failure_text

    settings = settings_from(config, ui={"api_url": api_url, "api_key": api_key, "host": host, "port": port})
    target = api_url_of(settings)
    try:
        health = ApiClient(target).health()
        if not health.ready:
            console.print(f"[yellow]the model is {health.status}[/yellow]: {health.detail or ''}", highlight=False)
    except ServiceError as err:
        warn(f"{failure_text(err)} The page will say so until it answers.")
    process = start_ui(settings, target, settings.ui.port)
    catch_stop_signals()  # a `kill` or a closed terminal must not orphan the Streamlit server
    try:
        url = wait_until_up(settings.ui.port, host=settings.ui.host, process=process)
        console.print(f"UI: [bold]{url}[/bold]  (API: {target}; Ctrl-C stops it)", highlight=False)
        process.wait()
    finally:
        ignore_stop_signals()
        stop_ui(process)
    if process.returncode not in (0, -15, None):
        fail(f"the Streamlit server exited with code {process.returncode}")
