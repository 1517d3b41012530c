"""Starting and stopping the real Streamlit server, and the `aipd ui` command's wiring."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from app.config import Settings
from tests.helpers import free_port, wait_until
from tests.ui.contract_server import ContractServer
from ui.launch import UiStartError, start_ui, stop_ui, ui_environment, wait_until_up


def test_the_page_process_gets_the_resolved_settings() -> None:
    settings = Settings(api_keys=["served-key"], ui={"grafana_url": "http://g:3000"}, serve={"max_batch_files": 5})
    env = ui_environment(settings, "http://api:8000")
    assert env == {
        "AIPD_UI__API_URL": "http://api:8000",
        "AIPD_UI__API_KEY": "served-key",
        "AIPD_UI__GRAFANA_URL": "http://g:3000",
        "AIPD_SERVE__MAX_BATCH_FILES": "5",
    }


def test_start_serve_the_page_and_stop(contract: ContractServer, tmp_path) -> None:
    port = free_port()
    log_path = tmp_path / "streamlit.log"
    with log_path.open("w") as log:
        process = start_ui(Settings(), contract.url, port, log_file=log)
        try:
            url = wait_until_up(port, process=process)
            assert url == f"http://127.0.0.1:{port}"
            page = httpx.get(url, timeout=10)
            assert page.status_code == 200 and "<noscript>" in page.text  # Streamlit's own page shell

            second = start_ui(Settings(), contract.url, port, log_file=log)  # same port: must fail, and say so
            try:
                second.wait(timeout=30)
                with pytest.raises(UiStartError, match="exited with code 1"):
                    wait_until_up(port, process=second)
            finally:
                stop_ui(second)
        finally:
            stop_ui(process)
    assert process.returncode is not None
    assert f"Port {port} is not available" in log_path.read_text()


def test_ui_command_is_registered_with_help() -> None:
    from aipd.cli import app

    result = CliRunner().invoke(app, ["ui", "--help"])
    assert result.exit_code == 0, result.output
    assert "--api-url" in result.output and "aipd ui --port 8600" in result.output


@pytest.mark.slow
def test_ui_command_serves_the_page_and_a_kill_stops_its_server(contract: ContractServer, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    log_path = tmp_path / "aipd-ui.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPD_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    with log_path.open("w") as log:
        command = subprocess.Popen(
            [sys.executable, "-m", "aipd.cli", "ui", "--port", str(port), "--api-url", contract.url],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            wait_until_up(port, process=command, timeout_s=90)
            assert httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=5).text == "ok"
            wait_until(lambda: f"UI: http://127.0.0.1:{port}" in log_path.read_text(), 30, what="the UI address")
            command.send_signal(signal.SIGTERM)
            assert command.wait(timeout=30) == 128 + signal.SIGTERM
        finally:
            stop_ui(command)
    with pytest.raises(httpx.TransportError):  # the Streamlit child went down with the command
        httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
