"""What a tuning run searches over, and how it picks the next point and stops weak trials.

Every key of the search space is an ``overrides`` key of ``training.trainer.build_trainer``, so a trial's config
goes straight into the trainer. The learning rate and weight decay span orders of magnitude, so they are sampled
log-uniformly; the rest are short lists of values that make sense for this model and data.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from app.config import TuneSettings
from app.logging import get_logger

log = get_logger("aipd.tune")

TIME_ATTR = "epochs_done"
SEARCH_KEYS = ("lr", "weight_decay", "dropout", "batch_size", "crop_size", "augment_prob")


def build_search_space(tune: TuneSettings) -> dict[str, Any]:
    """Tune distributions from the settings; a range whose ends are equal is a fixed value."""
    from ray import tune as rt

    def log_uniform(bounds: tuple[float, float]) -> Any:
        low, high = bounds
        return low if low == high else rt.loguniform(low, high)

    return {
        "lr": log_uniform(tune.lr),
        "weight_decay": log_uniform(tune.weight_decay),
        "dropout": rt.choice(list(tune.dropout)),
        "batch_size": rt.choice(list(tune.batch_size)),
        "crop_size": rt.choice(list(tune.crop_size)),
        "augment_prob": rt.choice(list(tune.augment_prob)),
    }


def has_grid(space: dict[str, Any]) -> bool:
    return any(isinstance(v, dict) and "grid_search" in v for v in space.values())


def expected_trials(space: dict[str, Any], num_samples: int) -> int:
    """How many trials a finished experiment holds: a grid is repeated ``num_samples`` times."""
    grid = 1
    for value in space.values():
        if isinstance(value, dict) and "grid_search" in value:
            grid *= len(value["grid_search"])
    return grid * num_samples


def resolve_search_alg(name: str, space: dict[str, Any]) -> str:
    """The algorithm that will really run: model-based searchers need their library and cannot walk a grid."""
    if name == "random":
        return name
    if has_grid(space):
        log.warning("search_alg_fallback", asked=name, using="random", reason="a grid search needs random search")
        return "random"
    if importlib.util.find_spec(name) is None:
        log.warning("search_alg_fallback", asked=name, using="random", reason=f"{name} is not installed")
        return "random"
    return name


def build_search_alg(name: str, seed: int, max_concurrent: int) -> Any:
    """The Tune searcher for ``name`` (already resolved), limited to ``max_concurrent`` trials in flight.

    The limit lives here, not in ``TuneConfig.max_concurrent_trials``, because Tune ignores that for the random
    generator. Metric and mode come from the TuneConfig.
    """
    from ray.tune.search import ConcurrencyLimiter

    if name == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed)), max_concurrent)
    if name == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return ConcurrencyLimiter(HyperOptSearch(random_state_seed=seed), max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def build_scheduler(tune: TuneSettings) -> Any:
    """ASHA on validation AUROC per epoch: a trial must run ``grace_period`` epochs before it can be stopped."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tune.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        max_t=tune.epochs,
        grace_period=min(tune.grace_period, tune.epochs),
        reduction_factor=tune.reduction_factor,
    )
