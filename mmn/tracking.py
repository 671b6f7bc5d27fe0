"""MLflow and provenance helpers shared by the task modules (tracking store, commit, vocab).

They sit apart from the task functions so the gate, train and evaluate modules can use them
without importing each other.
"""

from __future__ import annotations

import math
import os
import subprocess
from collections.abc import Mapping
from typing import Any

from core.config import REPO_ROOT, PipelineConfig


def setup_mlflow(cfg: PipelineConfig, experiment: str | None = None) -> str:
    """Point MLflow at the configured store and make sure the experiment exists."""
    import mlflow

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_registry_uri(cfg.mlflow.tracking_uri)
    name = experiment or cfg.mlflow.experiment
    if os.environ.get("MLFLOW_RUN_ID"):
        # Under `mlflow run`, the project's run already fixes the experiment.
        return mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        cfg.mlflow.artifact_root.mkdir(parents=True, exist_ok=True)
        exp_id = mlflow.create_experiment(name, artifact_location=(cfg.mlflow.artifact_root / name).as_uri())
    else:
        exp_id = found.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def vocab_lists(cfg: PipelineConfig) -> tuple[list[str], list[str]]:
    from core.vocab import load_vocab

    types = load_vocab(cfg.paths.vocab_dir, cfg.domains.type_field).values()
    scenarios = load_vocab(cfg.paths.vocab_dir, cfg.domains.scenario_field).values()
    if not types or not scenarios:
        raise RuntimeError(f"domain vocabularies under {cfg.paths.vocab_dir} are empty: build a day first")
    return types, scenarios


def metrics_to_log(metrics: Mapping[str, Any], *, prefix: str = "", per_domain: bool = True,
                   ) -> dict[str, float]:
    """The one filter before ``mlflow.log_metrics``: training.metrics.loggable (drops
    undefined values), then non-finite ones (MLflow stores no NaN/inf); ``per_domain=False``
    also drops the per-domain breakdown (it goes to the per-domain table artifact)."""
    from training.metrics import loggable

    kept = {k: v for k, v in metrics.items() if per_domain or "_domain/" not in k}
    return {f"{prefix}{k}": v for k, v in loggable(kept).items() if math.isfinite(v)}
