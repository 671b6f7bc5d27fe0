"""SSIM for one day of the pipeline: search on the day's window, choose the ratio, record it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from core.config import PipelineConfig, Ssim
from training.options import TrainOptions
from training.ssim.ratio import choose_ratio
from training.ssim.search import active_mlflow, search
from training.ssim.store import record_choice


def run_search_for_day(
    cfg: PipelineConfig,
    day: str,
    train_days: Sequence[str],
    model_kind: str,
    *,
    cold_start: bool = False,
    ssim: Ssim | None = None,
    num_threads: int | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Search on the day's training window, choose the ratio on validation, record it in the
    set's manifest, log to the active MLflow run; returns what train() needs to reuse it.
    ``cold_start`` (TrainingPlan.cold_start) searches / validates on the non-holdout buckets;
    ``max_steps`` caps the search only."""
    ssim = ssim or cfg.ssim
    split = "train" if cold_start else None
    holdout = cfg.windows.cold_start_holdout_fraction if cold_start else None
    shared = search(cfg, train_days, model_kind=model_kind, ssim=ssim, split=split,
                    holdout_fraction=holdout, num_threads=num_threads, max_steps=max_steps)
    metric = ssim.ratio_metric
    options = TrainOptions(model_kind=model_kind, split=split, holdout_fraction=holdout,
                           progress=False, num_threads=num_threads)
    ratio, table = choose_ratio(cfg, train_days, shared, ssim.ratio_grid, metric=metric,
                                options=options)
    shared = record_choice(cfg, shared.set_id, ratio, table, metric, day=day)
    mlflow = active_mlflow()
    if mlflow is not None:
        mlflow.log_metric("ssim/chosen_ratio", ratio)
        mlflow.log_text(table.to_csv(), f"ssim/{shared.set_id}/ratio_table.csv")
        mlflow.set_tag("ssim.chosen_ratio", str(ratio))
    return {"day": day, "set_id": shared.set_id, "ratio": ratio, "path": str(shared.path),
            "model_kind": model_kind, "selection_ratio": shared.manifest["selection_ratio"],
            "ratio_metric": metric,
            "ratio_table": json.loads(table.reset_index().to_json(orient="records"))}
