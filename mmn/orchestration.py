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


DAILY_DESCRIPTION = (
    "Daily CVR retrain of one impression day D (the data interval's day minus the label "
    "delay): Spark build -> GX validation -> train -> holdout evaluation against the "
    "champion -> gate on the MLflow `champion` alias."
)

# What each task reads and writes (the task's doc_md, shown on its page in the Airflow UI).
TASK_DOCS: dict[str, str] = {
    "resolve_day": "**Reads** the run's data interval, or the `date` param. **Writes** nothing; "
                   "returns the impression day D = interval day − `windows.label_delay_days`.",
    "check_raw_logs": "**Reads** `<raw_root>/impressions/dt=D/`. **Writes** nothing; fails in "
                      "seconds, naming the folder, when the day has no impression files.",
    "build_samples": "spark-submit `spark_jobs/build_samples.py --day D`. **Reads** impressions "
                     "of D, clicks and conversions of D and the following days the windows reach. "
                     "**Writes** `<lake_root>/samples/dt=D/` (Parquet), `quarantine/dt=D/`, "
                     "`manifests/dt=D.json` and the staged vocabulary `vocab/staged/dt=D/`.",
    "validate": "Great Expectations on the day's samples and manifest. **Reads** the samples, "
                "manifest and staged vocabulary of D and the trailing days' manifests. **Writes** "
                "`<lake_root>/validation/dt=D/results.json`, the Data Docs under "
                "`<reports_root>/data_docs/` and, when D passes, the new domain values to "
                "`vocab/*.json`. Error checks fail the task.",
    "train": "**Reads** the samples of the training window before D (a hash split of D on a cold "
             "start) and the committed vocabulary. **Writes** an MLflow run (params, training "
             "curves, dataset inputs, the day's Data Docs page, the serving model) and "
             "checkpoints under `<reports_root>/checkpoints/`; returns the MLflow run id.",
    "evaluate": "**Reads** the run's model, the `champion` version (loaded by its number) and the "
                "samples of D (the holdout). **Writes** to the run: headline AUCs (`auc_*`, the "
                "champion's `champ_auc_*`, `gate_margin`), `holdout/*` aggregates, per-type / "
                "per-scenario / per-domain tables and plots, `evaluation/holdout_eval.json`.",
    "gate_and_promote": "**Reads** the evaluation. **Writes** a registered model version with the "
                        "decision in its tags and description; on a pass moves `champion` (the "
                        "former keeps `previous`); the gate report on the run and in "
                        "`<reports_root>/gate/`; the run's description. Its log and return value "
                        "carry the MLflow run's URL.",
}


def mlflow_ui_base(cfg: PipelineConfig) -> str:
    """The MLflow UI's address: $MMN_MLFLOW_UI_URL, a server tracking URI itself, else the
    local `make mlflow-ui` default."""
    import os

    configured = os.environ.get("MMN_MLFLOW_UI_URL")
    if configured:
        return configured.rstrip("/")
    if cfg.mlflow.tracking_uri.startswith(("http://", "https://")):
        return cfg.mlflow.tracking_uri.rstrip("/")
    return "http://127.0.0.1:5000"


def mlflow_run_url(cfg: PipelineConfig, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of one run."""
    return f"{mlflow_ui_base(cfg)}/#/experiments/{experiment_id}/runs/{run_id}"


def run_note(summary: dict[str, Any], url: str | None = None) -> str:
    """A DAG run's note (Markdown): the impression day, the gate decision, the MLflow run."""
    version = f" (v{summary['version']})" if summary.get("version") else ""
    note = (f"Impression day **{summary.get('day')}**: {summary.get('decision', '?')}{version}. "
            f"{summary.get('reason', '')}")
    return f"{note}\n\nMLflow run: {url}" if url else note


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
