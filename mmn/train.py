"""Train one day's model: the window's run in MLflow, the optional SSIM plug-in, the serving model."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from core.config import PipelineConfig
from mmn.plan import TrainingPlan, training_plan
from mmn.tracking import (
    git_commit,
    log_day_datasets,
    logged_model_name,
    metrics_to_log,
    setup_mlflow,
    vocab_lists,
)

log = logging.getLogger(__name__)


def checkpoint_dir(cfg: PipelineConfig, kind: str, day: str) -> Path:
    """Where a day's run of one model kind keeps its checkpoint (one folder per kind and day)."""
    return cfg.paths.reports_root / "checkpoints" / f"{kind}-{day}"


def day_identity(cfg: PipelineConfig, day: str) -> str:
    """The identity of a day's inputs for the checkpoint fingerprint (training.checkpoints)."""
    from training.checkpoints import day_identity as identity

    return identity(cfg, day)


def example_records(cfg: PipelineConfig, day: str, types: list[str], scenarios: list[str], n: int = 5) -> list[dict]:
    """A few real, valid impression records of ``day`` (the model's logged input example)."""
    wanted = [cfg.domains.type_field, cfg.domains.scenario_field, *(f.name for f in cfg.features)]
    found: list[dict] = []
    for path in sorted(cfg.paths.raw_dir("impressions", day).glob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and rec.get(wanted[0]) in types and rec.get(wanted[1]) in scenarios:
                    found.append({k: rec.get(k) for k in wanted})
                if len(found) >= n:
                    return found
    if not found:
        raise RuntimeError(f"no valid raw impression found for {day} to use as the model's input example")
    return found


def train_day(
    cfg: PipelineConfig,
    day: str,
    *,
    model_kind: str | None = None,
    window_days: int | None = None,
    experiment: str | None = None,
    extra_tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    ssim: str | None = None,
) -> str:
    """Train on the day's window, log the run and the serving model; returns the run id.

    ``ssim`` (default: the config's ssim.mode): "search" runs the SSIM search on the window
    and retrains with the chosen share ratio; "reuse" takes the latest saved shared set.
    """
    import mlflow
    import pandas as pd

    from serving.pyfunc import ModelBundle, log_serving_model
    from training.options import TrainOptions
    from training.trainer import train

    kind = model_kind or cfg.model.kind
    ssim_mode = ssim or cfg.ssim.mode
    plan = training_plan(cfg, day, window_days)
    types, scenarios = vocab_lists(cfg)
    experiment_id = setup_mlflow(cfg, experiment)
    fail_stale_runs(experiment_id, day, kind, cfg.airflow.train_timeout_minutes)
    tags = {
        OWNER_HOST: socket.gethostname(),
        OWNER_PID: str(os.getpid()),
        "data_date": day,
        "training_window": plan.description,
        "model_kind": kind,
        "git_commit": git_commit(),
        "config_hash": cfg.config_hash(),
        "dataset_manifest": str(cfg.paths.manifest_path(day)),
        "ssim": ssim_mode,
        "cold_start": str(plan.cold_start).lower(),
        **(extra_tags or {}),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    # The run's description until evaluate and the gate replace it with their outcome.
    tags["mlflow.note.content"] = (
        f"{kind} trained for impression day {day} ({plan.description}); holdout: "
        f"{'a hash split of ' + day if plan.cold_start else day}. Not evaluated yet."
    )
    with mlflow.start_run(run_name=f"{kind} {day}", tags=tags) as run:
        mlflow.log_params(_flat_params(cfg, kind, plan))
        _log_day_inputs(cfg, day, plan)
        log_day_datasets(cfg, list(plan.train_days), day, day_identity)
        result = train(cfg, plan.train_days, TrainOptions(
            model_kind=kind,
            split="train" if plan.cold_start else None,
            holdout_fraction=cfg.windows.cold_start_holdout_fraction,
            checkpoint_dir=checkpoint_dir(cfg, kind, day),
            log_fn=lambda metrics, step: mlflow.log_metrics(metrics_to_log(metrics), step=step),
            step_loss=_shared_instances(cfg, day, plan, kind, ssim_mode),
            inputs={"holdout": day_identity(cfg, day)},
        ))
        mlflow.log_metrics(metrics_to_log({
            **{f"train/{k}": v for k, v in result.step_loss_stats.items()},
            "train/samples_per_sec": result.samples_per_sec,
            "train/steps": result.steps,
            "model/n_params": sum(p.numel() for p in result.model.parameters()),
            "model/n_domain_param_sets": result.model.n_domain_param_sets,
        }))
        bundle = ModelBundle(
            config=cfg.raw, model_kind=kind, n_types=result.n_types, n_scenarios=result.n_scenarios,
            types=types, scenarios=scenarios,
        )
        example = pd.DataFrame(example_records(cfg, day, types, scenarios))
        info = log_serving_model(cfg, result.model, bundle, example, name=logged_model_name(kind))
        mlflow.set_tag("model_uri", info.model_uri)
        run_id = run.info.run_id
    mark_finished(cfg, kind, day, run_id)
    prune_checkpoints(cfg, keep=cfg.training.checkpoint_retention)
    return run_id


def fail_stale_runs(experiment_id: str, day: str, kind: str, timeout_minutes: float) -> list[str]:
    """Mark FAILED the runs of this day and kind left RUNNING by a dead attempt (SIGKILL, OOM,
    a lost worker). A run is dead when it was started on this host by a process that no
    longer exists, or (another host, or a run from before the owner tags) when it has been
    RUNNING longer than the training timeout. Live concurrent runs of the same day and kind
    (a comparison or a search beside the daily run) are left alone."""
    import os
    import socket
    import time

    import psutil
    from mlflow import MlflowClient

    client = MlflowClient()
    current = os.environ.get("MLFLOW_RUN_ID")  # under `mlflow run`, this attempt's own run
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.data_date = '{day}' and tags.model_kind = '{kind}' "
                      "and attributes.status = 'RUNNING'",
    )
    host, now_ms = socket.gethostname(), time.time() * 1000
    stale = []
    for run in found:
        if run.info.run_id == current:
            continue
        tags = run.data.tags
        if tags.get(OWNER_HOST) == host and tags.get(OWNER_PID, "").isdigit():
            dead = not psutil.pid_exists(int(tags[OWNER_PID]))
        else:
            dead = now_ms - run.info.start_time > timeout_minutes * 60_000
        if dead:
            stale.append(run.info.run_id)
    for run_id in stale:
        client.set_tag(run_id, "mmn.failed_reason", "stale: its process died without closing the run")
        client.set_terminated(run_id, status="FAILED")
        log.warning("marked stale run %s (%s, %s) FAILED: its process is gone", run_id, kind, day)
    return stale


OWNER_HOST, OWNER_PID = "mmn.host", "mmn.pid"  # who runs a RUNNING run (fail_stale_runs)


FINISHED_MARKER = "finished.json"


def mark_finished(cfg: PipelineConfig, kind: str, day: str, run_id: str) -> None:
    """Record in the checkpoint folder that its run finished (pruning may then remove it)."""
    folder = checkpoint_dir(cfg, kind, day)
    if folder.is_dir():
        (folder / FINISHED_MARKER).write_text(json.dumps({"kind": kind, "day": day, "run_id": run_id}))


def prune_checkpoints(cfg: PipelineConfig, keep: int | None) -> list[Path]:
    """Remove the checkpoints of finished runs beyond the newest ``keep`` days per model kind
    (None keeps all); checkpoints without the finished marker stay, so a crash can resume."""
    if keep is None:
        return []
    root = cfg.paths.reports_root / "checkpoints"
    by_kind: dict[str, list[tuple[str, Path]]] = {}
    for marker in root.glob(f"*/{FINISHED_MARKER}") if root.is_dir() else ():
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        by_kind.setdefault(str(info.get("kind")), []).append((str(info.get("day")), marker.parent))
    removed = []
    for entries in by_kind.values():
        for _, folder in sorted(entries, reverse=True)[keep:]:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("pruned %d finished checkpoint(s) beyond the newest %d per kind", len(removed), keep)
    return removed


def _shared_instances(cfg: PipelineConfig, day: str, plan: TrainingPlan, kind: str, mode: str) -> Any:
    """The SSIM plug-in (training.hooks.StepLoss) for this run; None when off or when the
    chosen share ratio is 0 (then training is exactly plain)."""
    import mlflow

    from training.ssim import load_shared_set, run_search_for_day, shared_training

    if mode == "off":
        return None
    if mode == "search":
        info = run_search_for_day(cfg, day, plan.train_days, kind, cold_start=plan.cold_start)
        shared, ratio = load_shared_set(cfg, info["set_id"]), info["ratio"]
    elif mode == "reuse":
        shared = load_shared_set(cfg)
        ratio = shared.chosen_ratio
    else:
        raise ValueError(f"ssim must be off, search or reuse, got {mode!r}")
    mlflow.set_tags({"ssim.set_id": shared.set_id, "ssim.ratio": str(ratio)})
    return shared_training(cfg, shared, ratio) if ratio else None


def _flat_params(cfg: PipelineConfig, kind: str, plan: TrainingPlan) -> dict[str, Any]:
    params: dict[str, Any] = {"model.kind": kind, "train_days": ",".join(plan.train_days)}
    for section in ("model", "training"):
        for key, value in cfg.raw[section].items():
            params.setdefault(f"{section}.{key}", value)
    params["features"] = ",".join(f.name for f in cfg.features)
    return params


def _log_day_inputs(cfg: PipelineConfig, day: str, plan: TrainingPlan) -> None:
    """Attach the build manifests, the day's validation results and the day's Data Docs page
    (one self-contained HTML file, validation.docs.write_day_page) to the run."""
    import tempfile

    import mlflow

    from validation.docs import write_day_page

    for d in sorted({*plan.train_days, day}):
        manifest = cfg.paths.manifest_path(d)
        if manifest.exists():
            mlflow.log_artifact(str(manifest), artifact_path="manifests")
    results = cfg.paths.validation_dir(day)
    if results.is_dir():
        mlflow.log_artifacts(str(results), artifact_path="validation")
    with tempfile.TemporaryDirectory() as tmp:
        page = write_day_page(cfg, day, Path(tmp))
        if page is not None:
            mlflow.log_artifact(str(page), artifact_path="data_docs")
