"""A peer model's day as an MLflow run, logged like a network's, and holdout predictions.

The peers (training/peers.py: LightGBM, logistic regression with domain crosses) are
comparison rows: they get the same run tags, the same training plan (window, cold-start
split), the same evaluator and the same per-domain table as ``train_day`` +
``evaluate_day`` give a network, so the MLflow UI compares them side by side. They are not
registered or served: the daily DAG's models stay networks unless a user changes that.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from core.config import PipelineConfig

PEER_ARTIFACT = "peer"  # the fitted peer, pickled with joblib


def holdout_predictions(cfg: PipelineConfig, day: str, model: Any, cold_start: bool) -> pd.DataFrame:
    """predict_rows on the day's holdout: the whole day, or its hash split on a cold start."""
    from training.metrics import predict_rows

    return predict_rows(model, cfg, [day], split="holdout" if cold_start else None,
                        holdout_fraction=cfg.windows.cold_start_holdout_fraction)


def run_predictions(cfg: PipelineConfig, day: str, run_id: str) -> pd.DataFrame:
    """Holdout predictions of a logged network run (its serving model, its holdout rule)."""
    import mlflow

    from mmn.tracking import logged_model_uri
    from serving.pyfunc import load_serving_model

    run = mlflow.get_run(run_id)
    cold_start = run.data.tags.get("cold_start") == "true"
    model = load_serving_model(logged_model_uri(run)).model
    return holdout_predictions(cfg, day, model, cold_start)


def train_peer_day(cfg: PipelineConfig, day: str, kind: str, *, experiment: str | None = None,
                   extra_tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                   ) -> tuple[str, dict[str, float | None], pd.DataFrame]:
    """Fit ``kind`` on the day's training window, score its holdout, log one run.

    Returns (run id, holdout metrics as evaluate_day's "challenger", holdout predictions).
    """
    import joblib
    import mlflow
    import torch

    from mmn.plan import training_plan
    from mmn.tracking import git_commit, metrics_to_log, setup_mlflow, vocab_lists
    from training.metrics import metrics_from_predictions, per_domain_table
    from training.peers import fit_peer

    plan = training_plan(cfg, day)
    types, scenarios = vocab_lists(cfg)
    setup_mlflow(cfg, experiment)
    tags = {"data_date": day, "training_window": plan.description, "model_kind": kind,
            "model_family": "peer", "git_commit": git_commit(), "config_hash": cfg.config_hash(),
            "cold_start": str(plan.cold_start).lower(), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=f"{kind} {day}", tags=tags) as run:
        mlflow.log_params({"model.kind": kind, "train_days": ",".join(plan.train_days),
                           "training.seed": cfg.training.seed,
                           "training.validation_fraction": cfg.training.validation_fraction})
        peer = fit_peer(cfg, kind, plan.train_days, n_types=len(types), n_scenarios=len(scenarios),
                        split="train" if plan.cold_start else None,
                        holdout_fraction=cfg.windows.cold_start_holdout_fraction,
                        threads=torch.get_num_threads())
        mlflow.log_metrics(metrics_to_log(peer.fit_info))
        predictions = holdout_predictions(cfg, day, peer, plan.cold_start)
        if predictions.empty:
            raise ValueError(f"the holdout of {day} has no rows")
        metrics = metrics_from_predictions(predictions, types, scenarios,
                                           cfg.evaluation.min_domain_conversions)
        mlflow.log_metrics(metrics_to_log({f"holdout/{k}": v for k, v in metrics.items() if "_domain/" not in k}))
        mlflow.log_table(per_domain_table(predictions, types, scenarios), "evaluation/per_domain.json")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{kind}.joblib"
            joblib.dump({"ctr": peer.ctr, "cvr": peer.cvr, "types": types, "scenarios": scenarios}, path)
            mlflow.log_artifact(str(path), artifact_path=PEER_ARTIFACT)
        return run.info.run_id, metrics, predictions
