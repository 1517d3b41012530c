"""`aipd serve` and `aipd predict` as a user runs them (Typer's runner), without a running service."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from tests.helpers import free_port, jpeg


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    from aipd.cli import app

    return app


@pytest.mark.parametrize("command", ["serve", "predict"])
def test_help_has_examples(cli: typer.Typer, command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0 and "Examples" in result.output


def test_serve_dry_run_writes_a_valid_config(cli: typer.Typer, tmp_path: Path) -> None:
    from serving.config import validate_serve_config

    target = tmp_path / "serve.yaml"
    result = CliRunner().invoke(
        cli,
        [
            "serve",
            "--write-config",
            str(target),
            "--dry-run",
            "--replicas",
            "3",
            "--max-batch-size",
            "16",
            "--batch-wait-ms",
            "8",
            "--model-uri",
            "models:/other@staging",
            "--port",
            "9100",
        ],
    )
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(target.read_text())
    validate_serve_config(config)
    detector = config["applications"][0]["deployments"][1]
    assert detector["autoscaling_config"]["min_replicas"] == detector["autoscaling_config"]["max_replicas"] == 3
    assert detector["user_config"] == {
        "model_uri": "models:/other@staging",
        "max_batch_size": 16,
        "batch_wait_timeout_s": 0.008,
        "champion_poll_s": 10.0,
        "torch_threads": None,
        "precision": "auto",
        "cuda_graphs": True,
        "rollout_min_requests": 50,
        "rollout_error_margin": 0.05,
        "rollout_latency_margin": 0.5,
        "rollout_max_disagreement": 0.2,
    }
    assert config["http_options"]["port"] == 9100


def test_serve_refuses_a_path_that_is_no_checkpoint(cli: typer.Typer, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "serve",
            "--model-uri",
            str(tmp_path / "nothing-here"),
            "--write-config",
            str(tmp_path / "s.yaml"),
            "-c",
            str(_settings_file(tmp_path)),
        ],
    )
    assert result.exit_code == 1 and "not a checkpoint directory" in result.output


def test_predict_says_when_no_service_answers(cli: typer.Typer, tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg())
    result = CliRunner().invoke(cli, ["predict", str(image), "--url", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 1 and "cannot reach the service" in result.output


def _settings_file(tmp_path: Path) -> Path:
    path = tmp_path / "aipd.yaml"
    path.write_text(f"work_dir: {tmp_path / 'work'}\n")
    return path
