"""A checkpoint directory's file names, apart from the model code: a caller that only looks for a checkpoint (`aipd
serve` checking its --model-uri before anything starts, the registry, Tune's result scan) need not import torch and
timm to do so, which costs seconds of a command's start on a small machine."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.json"
VAL_SCORES_FILE = "val_scores.npz"  # the validation split's labels and raw logits, as the training scored them


def is_checkpoint(directory: str | Path) -> bool:
    """Whether a complete checkpoint lies there (config.json is written last, see app.model.save_checkpoint)."""
    directory = Path(directory)
    return (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()
