"""The residual verdict's fit after training: a linear model on the fixed residual statistics of training photos clean
and degraded, blended with the network's logit on validation, written into the checkpoint with the validation
scores its operating point is fitted on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.mark.slow
def test_the_residual_verdict_is_fitted_into_the_checkpoint_and_its_validation_scores(
    ray_cluster, small_demo: Path, tmp_path: Path
) -> None:
    from app.config import Settings
    from app.data import index_dataset
    from app.images import read_and_decode
    from app.model import load_checkpoint, read_val_scores
    from app.transforms import eval_preprocess, to_model_input
    from tests.helpers import make_checkpoint
    from training.residual_verdict import fit_residual_verdict

    index = index_dataset(str(small_demo))
    train, val = index.split("train"), index.split("val")
    settings = Settings(work_dir=tmp_path / "work")
    checkpoint = make_checkpoint(tmp_path / "ckpt", seed=1, crop_size=48, residual_verdict=True)

    fit = fit_residual_verdict(settings, checkpoint, train, val)

    assert fit is not None and fit["photos"] == len(train) and fit["val_photos"] == len(val)
    values = json.loads((checkpoint / "config.json").read_text())["residual_verdict"]
    assert {k: values[k] for k in fit} == fit and "weight" not in fit
    loaded = load_checkpoint(checkpoint)
    model = loaded.model
    assert model.residual_verdict.active and len(values["weight"]) == model.residual_verdict.width
    assert values["head_weight"] == round(values["head_scale"], 4)

    # the saved scores are the clean validation photos' blended logits, in the split's order: what the model says
    labels, logits = read_val_scores(checkpoint)
    assert len(logits) == len(val) and np.array_equal(labels, val["label"].to_numpy().astype(int))
    crops = [eval_preprocess(read_and_decode(str(path), settings.images), 48) for path in val["path"][:8]]
    x = to_model_input(np.stack(crops), device="cpu")
    with torch.no_grad():
        head = model.head(model.backbone(model.stem(x))).squeeze(1).double()
        statistics = model.residual_statistics(x).double()
        blend = values["head_scale"] * head + statistics @ torch.tensor(values["weight"]).double() + values["bias"]
        torch.testing.assert_close(model(x).double(), blend, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits[:8], blend.numpy(), rtol=1e-4, atol=1e-4)

    # deterministic: a refit (whatever order Ray Data delivers the crops in) writes the same verdict
    config = (checkpoint / "config.json").read_bytes()
    assert fit_residual_verdict(settings, checkpoint, train, val) == fit
    assert (checkpoint / "config.json").read_bytes() == config

    # one label among the validation photos: nothing to blend, nothing written
    assert fit_residual_verdict(settings, checkpoint, train, val[val["label"] == 0]) is None
    assert (checkpoint / "config.json").read_bytes() == config

    # a model without residual statistics has no verdict to fit
    plain = make_checkpoint(tmp_path / "plain", seed=1)
    before = {path.name: path.read_bytes() for path in plain.iterdir()}
    assert fit_residual_verdict(settings, plain, train, val) is None
    assert {path.name: path.read_bytes() for path in plain.iterdir()} == before
