"""``aipd evaluate``: resolve a model, evaluate it on a dataset's test split, write the report, log it to MLflow."""

from __future__ import annotations

import time
from pathlib import Path

from app.config import Settings
from training.evaluate import EvaluationReport, evaluate_loaded, report_metrics, write_report


def evaluate_command(
    settings: Settings, model_uri: str | None, out: Path | None, *, robustness: bool = True, by_source: bool = False
) -> EvaluationReport:
    import mlflow

    from app.data import DatasetError, index_dataset, resolve_data_path
    from app.model import load_checkpoint
    from app.model_ref import parse_model_ref
    from app.ray_runtime import init_ray
    from app.registry import resolve_model, setup_mlflow, source_run

    ref = parse_model_ref(model_uri or settings.default_model_uri)
    resolved = resolve_model(settings, ref.uri)
    data_path = resolve_data_path(settings)
    index = index_dataset(data_path)
    index.require_splits("test")
    if by_source and not index.has_generators:
        raise DatasetError(
            f"{data_path} does not name the generator of its AI photos: --by-source needs a `generator` column in "
            "its manifest (or a manifest.csv with one in the dataset folder)"
        )
    init_ray(settings)
    loaded = load_checkpoint(resolved.checkpoint_dir)
    report = evaluate_loaded(
        loaded,
        index.split("test"),
        settings.images,
        model_name=ref.uri,
        data_name=data_path,
        robustness=robustness,
        target_fpr=float(loaded.operating_point.get("target_fpr", settings.train.target_fpr)),
    )
    out_dir = out or settings.work_dir.resolve() / "reports" / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}"
    write_report(report, out_dir)

    experiment_id = setup_mlflow(settings)
    run_id = source_run(ref)
    start = {"run_id": run_id} if run_id else {"experiment_id": experiment_id, "run_name": "evaluate"}
    with mlflow.start_run(**start):
        mlflow.log_metrics(report_metrics(report, "eval_"))
        mlflow.log_artifacts(str(out_dir), artifact_path=f"evaluation/{out_dir.name}")
    return report
