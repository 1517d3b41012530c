"""A training's MLflow run as the driver keeps it: created before Ray trains (rank 0 logs its epochs into it), with
the settings as parameters and the software and hardware it ran on as tags."""

from __future__ import annotations

import platform
from typing import Any

from app.config import Settings


def start_run(
    client: Any,
    experiment_id: str,
    name: str,
    settings: Settings,
    data_path: str,
    use_gpu: bool,
    counts: dict[str, dict[str, int]],
) -> str:
    """A run that stays RUNNING while Ray trains (rank 0 logs its epochs into it) and ends FINISHED or FAILED."""
    from mlflow.entities import Param, RunTag

    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    params = _flat({"train": settings.train.model_dump(), "model": settings.model.model_dump()})
    params.update(
        {
            "data": data_path,
            "use_gpu": use_gpu,
            **{f"n_{split}_{cls}": n for split, c in counts.items() for cls, n in c.items()},
        }
    )
    client.log_batch(
        run_id,
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in _system_tags().items()],
    )
    return run_id


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _system_tags() -> dict[str, str]:
    import ray
    import timm
    import torch

    tags = {
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "host": platform.node(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        tags["gpu"] = torch.cuda.get_device_name(0)
    return tags
