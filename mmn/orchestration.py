"""Airflow-facing pieces that the DAG files import: params, assets, defaults, callbacks.

Cheap to import (no torch, Spark or GX): the dag-processor parses DAG files often.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from core.config import SSIM_MODES, PipelineConfig
from mmn.model_kinds import MODEL_KINDS

log = logging.getLogger(__name__)

# The daily pipeline's steps in order, written once: the DAG chains its tasks (task ids) in
# this order and mmn.tasks.run_day runs them in this order.
STEPS: tuple[str, ...] = (
    "resolve_day", "check_raw_logs", "build_samples", "validate", "train", "evaluate",
    "gate_and_promote",
)


def daily_params(cfg: PipelineConfig) -> dict[str, Any]:
    """Validated params of a manual trigger; defaults come from the pipeline config."""
    from airflow.sdk import Param

    return {
        "date": Param(
            None, type=["null", "string"], format="date",
            description="Impression day to build and hold out (YYYY-MM-DD). "
                        "Empty: the data interval's day minus the label delay.",
        ),
        "model_kind": Param(cfg.model.kind, type="string", enum=list(MODEL_KINDS),
                            description="Model to train."),
        "train_window_days": Param(cfg.windows.train_window_days, type="integer", minimum=1, maximum=90,
                                   description="Days before the holdout day to train on."),
        "min_delta": Param(cfg.gate.min_delta, type="number", minimum=-1, maximum=1,
                           description="Gate: challenger must beat the champion by this much."),
        "floor": Param(cfg.gate.floor, type="number", minimum=0, maximum=1,
                       description="Gate: absolute floor on the gate metric."),
        "ssim": Param(cfg.ssim.mode, type="string", enum=list(SSIM_MODES),
                      description="SSIM: off, search (select shared instances, then retrain), "
                                  "reuse (the latest saved shared-instance set)."),
        "dry_run": Param(False, type="boolean",
                         description="Train and evaluate, but register and promote nothing."),
    }


def samples_asset(cfg: PipelineConfig) -> Any:
    from airflow.sdk import Asset

    return Asset(name="mmn_samples", uri=cfg.paths.samples_root.as_uri())


def champion_asset(cfg: PipelineConfig) -> Any:
    from airflow.sdk import Asset

    return Asset(name="mmn_champion_model",
                 uri=f"mlflow://registered-models/{cfg.mlflow.registered_model}/champion")


def default_args(cfg: PipelineConfig) -> dict[str, Any]:
    return {
        "owner": "ads-ml",
        "retries": cfg.airflow.retries,
        "retry_delay": dt.timedelta(minutes=cfg.airflow.retry_delay_minutes),
        "retry_exponential_backoff": True,
        "on_failure_callback": on_task_failure,
    }


def failure_summary(context: dict[str, Any]) -> str:
    """One line a person can act on: which task, which day, what went wrong."""
    ti = context.get("ti") or context.get("task_instance")
    params = context.get("params") or {}
    exc = context.get("exception")
    first_line = str(exc).strip().splitlines()[0] if exc and str(exc).strip() else repr(exc)
    return (
        f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} "
        f"dag={getattr(ti, 'dag_id', '?')} task={getattr(ti, 'task_id', '?')} "
        f"run={context.get('run_id', '?')} date={params.get('date') or context.get('ds', '?')} "
        f"try={getattr(ti, 'try_number', '?')} error={type(exc).__name__ if exc else 'unknown'}: {first_line}"
    )


def on_task_failure(context: dict[str, Any]) -> None:
    """Failure callback: log the summary and append it to the failures file (see README)."""
    from core.config import load_config

    summary = failure_summary(context)
    log.error("TASK FAILED: %s", summary)
    path = load_config().paths.failures_log
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(summary + "\n")
