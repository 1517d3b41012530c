"""A tuning configuration small enough for 2 CPU cores: 48-px crops, batch 8, one Train worker per trial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.config import Settings, load_settings

TINY_SPACE = {"batch_size": [8], "crop_size": [48], "dropout": [0.1], "augment_prob": [0.3],
              "lr": (1e-3, 3e-3), "weight_decay": (1e-3, 1e-2)}


def tiny_tune_values(**tune: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"num_samples": 4, "max_concurrent": 2, "epochs": 3, "search_alg": "random",
                              "grace_period": 1, "reduction_factor": 2, "cpus_per_trial": 1, **TINY_SPACE}
    values.update(tune)
    return values


def tiny_tune_settings(work_dir: Path, data: Path, **tune: Any) -> Settings:
    return load_settings(
        work_dir=work_dir, data={"path": str(data)}, log_format="console",
        train={"num_workers": 1, "use_gpu": False, "batch_size": 8, "crop_size": 48}, tune=tiny_tune_values(**tune),
    )


def invoke(app: Any, args: list[str]) -> Any:
    """CliRunner.invoke, then point logging back at the real stderr: the command configured structlog with the
    runner's temporary stream, which is closed once the command returns."""
    from typer.testing import CliRunner

    from app.logging import configure_logging

    result = CliRunner().invoke(app, args)
    configure_logging("json")
    configure_logging("console")
    return result
