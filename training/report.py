"""``aipd evaluate``: resolve a model, evaluate it on a dataset's test split, write the report, log it to MLflow."""

from __future__ import annotations

import math
import time
from pathlib import Path

from app.config import Settings
from training.evaluate import EvaluationReport, evaluate_loaded, write_report


def evaluate_command(
    settings: Settings, model_uri: str | None, out: Path | None, *, robustness: bool = True
) -> EvaluationReport:
    import mlflow

    from app.data import index_dataset, resolve_data_path
    from app.model import load_checkpoint
    from app.model_ref import parse_model_ref
    from app.ray_runtime import init_ray
    from app.registry import resolve_model, setup_mlflow, source_run

    ref = parse_model_ref(model_uri or settings.default_model_uri)
    resolved = resolve_model(settings, ref.uri)
    data_path = resolve_data_path(settings)
    index = index_dataset(data_path)
    index.require_splits("test")
    init_ray(settings)
    loaded = load_checkpoint(resolved.checkpoint_dir)
    report = evaluate_loaded(
        loaded, index.split("test"), settings.images, model_name=ref.uri, data_name=data_path, robustness=robustness
    )
    out_dir = out or settings.work_dir.resolve() / "reports" / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}"
    write_report(report, out_dir)

    experiment_id = setup_mlflow(settings)
    run_id = source_run(ref)
    start = {"run_id": run_id} if run_id else {"experiment_id": experiment_id, "run_name": "evaluate"}
    with mlflow.start_run(**start):
        prefix = "eval_"
        mlflow.log_metrics(
            {
                prefix + k: v
                for k, v in report.to_json().items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        mlflow.log_metrics({f"{prefix}robust_{k}": v for k, v in report.robustness.items() if not math.isnan(v)})
        mlflow.log_artifacts(str(out_dir), artifact_path=f"evaluation/{out_dir.name}")
    return report
