"""The search space, the searcher choice and the command's guard rails: no Ray cluster needed."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from pydantic import ValidationError
from ray import tune as rt

from app.config import TuneSettings, load_settings
from tests.helpers import invoke
from tuning.search_space import (
    SEARCH_KEYS,
    build_search_space,
    expected_trials,
    resolve_search_alg,
)


def test_space_keys_are_trainer_overrides() -> None:
    from training import trainer

    source = inspect.getsource(trainer.build_trainer)
    space = build_search_space(TuneSettings())
    assert set(space) == set(SEARCH_KEYS)
    for key in space:
        assert f'"{key}"' in source, f"build_trainer does not read the override {key!r}"


def test_rates_are_log_uniform_and_the_rest_are_choices() -> None:
    space = build_search_space(TuneSettings(lr=(1e-4, 1e-2), weight_decay=(0.01, 0.01), batch_size=[16, 32]))
    lr = space["lr"]
    assert isinstance(lr.get_sampler(), rt.search.sample.LogUniform)
    assert (lr.lower, lr.upper) == (1e-4, 1e-2)
    samples = [lr.sample() for _ in range(200)]
    assert all(1e-4 <= s <= 1e-2 for s in samples)
    assert sum(s < 1e-3 for s in samples) > 50, "log-uniform: about half the draws lie below the geometric middle"
    assert space["weight_decay"] == 0.01, "a range with equal ends is a fixed value"
    assert space["batch_size"].categories == [16, 32]


@pytest.mark.parametrize("bad", [{"lr": (0.0, 1e-3)}, {"lr": (1e-2, 1e-3)}, {"dropout": []}, {"search_alg": "grid"}])
def test_bad_search_settings_are_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        TuneSettings(**bad)


def test_search_alg_falls_back_to_random() -> None:
    space = build_search_space(TuneSettings())
    assert resolve_search_alg("optuna", space) == "optuna"
    assert resolve_search_alg("random", space) == "random"
    assert resolve_search_alg("optuna", {**space, "lr": rt.grid_search([1e-3, 1e-2])}) == "random"
    try:
        import hyperopt  # noqa: F401

        assert resolve_search_alg("hyperopt", space) == "hyperopt"
    except ImportError:
        assert resolve_search_alg("hyperopt", space) == "random"


def test_expected_trials_counts_grid_repeats() -> None:
    space = {"lr": rt.grid_search([1, 2, 3]), "wd": rt.grid_search([1, 2]), "dropout": rt.choice([0.1])}
    assert expected_trials(space, 2) == 12
    assert expected_trials({"lr": rt.loguniform(1e-4, 1e-2)}, 5) == 5


def test_resume_without_an_experiment_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aipd.cli import app

    monkeypatch.setenv("AIPD_WORK_DIR", str(tmp_path))
    result = invoke(app, ["tune", "--resume"])
    assert result.exit_code == 1
    assert "no tuning experiment" in result.output and "aipd tune" in result.output
    assert "Traceback" not in result.output


def test_a_new_experiment_never_reuses_a_name(tmp_path: Path) -> None:
    from tuning.tune import TuningError, run_tuning

    settings = load_settings(work_dir=tmp_path, tune={"name": "taken"})
    (settings.ray_storage / "tune-taken").mkdir(parents=True)
    with pytest.raises(TuningError, match="--resume --name taken"):
        run_tuning(settings)
