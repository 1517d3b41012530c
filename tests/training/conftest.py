"""A small demo set and a tiny training configuration shared by the training tests."""

from __future__ import annotations

from pathlib import Path

from app.config import Settings, load_settings


def tiny_settings(work_dir: Path, data: Path, **train: object) -> Settings:
    """Two CPU workers, 48-px crops, a couple of epochs: seconds per epoch on 2 cores."""
    values = {"epochs": 2, "batch_size": 8, "crop_size": 48, "num_workers": 2, "use_gpu": False, "lr": 2e-3}
    values.update(train)
    return load_settings(work_dir=work_dir, data={"path": str(data)}, train=values, log_format="console")
