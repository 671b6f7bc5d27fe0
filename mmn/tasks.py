"""The pipeline's steps, one function per DAG task, shared by the DAGs, the CLI and MLproject.

Keeping the logic here (not in dags/) means the DAG files stay cheap to parse and the
same code runs whether a step is triggered by Airflow, `mmn <stage>` or `mlflow run`.
Heavy imports (torch, mlflow, pyspark, great_expectations) happen inside the functions.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from core.config import REPO_ROOT, PipelineConfig
from mmn.gate import gate_day
from mmn.tracking import git_commit, setup_mlflow, vocab_lists

log = logging.getLogger(__name__)

BUILD_JOB = REPO_ROOT / "spark_jobs" / "build_samples.py"
EVAL_ARTIFACT = "evaluation/holdout_eval.json"


# ---------------------------------------------------------------- which day, which window


def parse_day(day: str) -> dt.date:
    try:
        return dt.date.fromisoformat(day)
    except ValueError:
        raise ValueError(f"day {day!r} is not an ISO date (YYYY-MM-DD)") from None


def resolve_day(cfg: PipelineConfig, explicit: str | None, interval_start: dt.datetime | None) -> str:
    """The impression day a run builds: an explicit date, else the data interval's day
    minus the label delay (that day's conversions have had time to arrive)."""
    if explicit:
        return parse_day(explicit).isoformat()
    if interval_start is None:
        raise ValueError("no date given and the run has no data interval")
    from core.schedule import day_built_by

    return day_built_by(cfg, interval_start)


def check_raw_logs(cfg: PipelineConfig, day: str) -> int:
    """Fail in seconds, naming the folder, when day D has no impressions (before Spark starts)."""
    from core.raw_inputs import require_impressions

    files = require_impressions(cfg, day)
    log.info("raw impressions of %s: %d file(s) under %s", day, len(files), cfg.paths.raw_dir("impressions", day))
    return len(files)


def is_built(cfg: PipelineConfig, day: str) -> bool:
    samples = cfg.paths.samples_dir(day)
    return samples.is_dir() and any(samples.glob("*.parquet"))


@dataclass(frozen=True)
class TrainingPlan:
    """Which days train the model and which rows are held out (holdout rule: latest day)."""

    day: str
    train_days: list[str]
    missing_days: list[str]
    cold_start: bool

    @property
    def description(self) -> str:
        if self.cold_start:
            return f"cold start: {self.day} split by impression_id hash"
        return f"{self.train_days[0]}..{self.train_days[-1]} ({len(self.train_days)} days)"


def training_plan(cfg: PipelineConfig, day: str, window_days: int | None = None) -> TrainingPlan:
    k = window_days or cfg.windows.train_window_days
    d = parse_day(day)
    window = [(d - dt.timedelta(days=i)).isoformat() for i in range(k, 0, -1)]
    built = [w for w in window if is_built(cfg, w)]
    missing = [w for w in window if w not in built]
    if not built:
        return TrainingPlan(day, [day], missing, cold_start=True)
    return TrainingPlan(day, built, missing, cold_start=False)


# ---------------------------------------------------------------- build (Spark)


def spark_submit_command(cfg: PipelineConfig, day: str) -> list[str]:
    """The exact spark-submit invocation of the build job (used by CLI and tests)."""
    conf = [arg for key, value in spark_submit_conf(cfg).items() for arg in ("--conf", f"{key}={value}")]
    return [
        "spark-submit",
        "--master", cfg.spark.master,
        "--driver-memory", cfg.spark.driver_memory,
        *conf,
        str(BUILD_JOB),
        *build_job_args(cfg, day),
    ]


def spark_submit_conf(cfg: PipelineConfig) -> dict[str, str]:
    """Spark settings passed at submit time (the CLI's spark-submit and the DAG's operator)."""
    return {"spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions), **cfg.spark.jvm_conf()}


def build_job_args(cfg: PipelineConfig, day: Any) -> list[Any]:
    """The build job's arguments; ``day`` may be an Airflow XComArg, resolved at run time."""
    return ["--day", day, "--config", str(cfg.source)]


def build_day(cfg: PipelineConfig, day: str) -> dict[str, Any]:
    """Run the Spark build job for ``day`` through spark-submit; returns its manifest."""
    from mmn.airflow_env import airflow_env

    env = {**os.environ, **_spark_env(airflow_env(cfg))}
    proc = subprocess.run(spark_submit_command(cfg, day), env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"Spark build job for {day} failed (exit {proc.returncode}); see its log above")
    return read_manifest(cfg, day)


def _spark_env(env: dict[str, str]) -> dict[str, str]:
    keys = ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "SPARK_LOCAL_IP", "PATH", "MMN_CONFIG")
    return {k: env[k] for k in keys}


def read_manifest(cfg: PipelineConfig, day: str) -> dict[str, Any]:
    path = cfg.paths.manifest_path(day)
    if not path.exists():
        raise FileNotFoundError(f"no build manifest for {day} at {path}: run the build first")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- validate (GX)


def validate_day(cfg: PipelineConfig, day: str) -> dict[str, Any]:
    """Run the GX suite; raises ValidationFailed (task fails) on any error-level check."""
    from validation.runner import validate_or_raise

    report = validate_or_raise(cfg, day)  # logs its own warnings
    return {
        "day": day,
        "success": report.success,
        "rows": report.n_rows,
        "warnings": len(report.warnings),
        "data_docs": str(report.data_docs_index),
    }


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


# ---------------------------------------------------------------- train


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
    from training.ssim import ssim_config
    from training.trainer import train

    kind = model_kind or cfg.model.kind
    ssim_mode = ssim or ssim_config(cfg).mode
    plan = training_plan(cfg, day, window_days)
    types, scenarios = vocab_lists(cfg)
    setup_mlflow(cfg, experiment)
    tags = {
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
    with mlflow.start_run(run_name=f"{kind} {day}", tags=tags) as run:
        mlflow.log_params(_flat_params(cfg, kind, plan))
        _log_day_inputs(cfg, day, plan)
        shared_set, share_ratio = _shared_instances(cfg, day, plan, kind, ssim_mode)
        result = train(
            cfg,
            plan.train_days,
            model_kind=kind,
            split="train" if plan.cold_start else None,
            holdout_fraction=cfg.windows.cold_start_holdout_fraction,
            checkpoint_dir=cfg.paths.reports_root / "checkpoints" / f"{kind}-{day}",
            log_fn=lambda metrics, step: mlflow.log_metrics(_finite(metrics), step=step),
            shared_set=shared_set if share_ratio else None,
            share_ratio=share_ratio,
        )
        mlflow.log_metrics(_finite({
            "train/ssim_shared_rows": result.shared_rows,
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
        info = log_serving_model(cfg, result.model, bundle, example)
        mlflow.set_tag("model_uri", info.model_uri)
        return run.info.run_id


def _shared_instances(cfg: PipelineConfig, day: str, plan: TrainingPlan, kind: str, mode: str) -> tuple[Any, float | None]:
    """The SSIM shared-instance set and share ratio for this run (None, None when off)."""
    import mlflow

    from training.ssim import load_shared_set, run_search_for_day

    if mode == "off":
        return None, None
    if mode == "search":
        info = run_search_for_day(cfg, day, plan.train_days, kind, cold_start=plan.cold_start)
        shared, ratio = load_shared_set(cfg, info["set_id"]), info["ratio"]
    elif mode == "reuse":
        shared = load_shared_set(cfg)
        ratio = shared.chosen_ratio
    else:
        raise ValueError(f"ssim must be off, search or reuse, got {mode!r}")
    mlflow.set_tags({"ssim.set_id": shared.set_id, "ssim.ratio": str(ratio)})
    return shared, ratio


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    import math

    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def _flat_params(cfg: PipelineConfig, kind: str, plan: TrainingPlan) -> dict[str, Any]:
    params: dict[str, Any] = {"model.kind": kind, "train_days": ",".join(plan.train_days)}
    for section in ("model", "training"):
        for key, value in cfg.raw[section].items():
            params.setdefault(f"{section}.{key}", value)
    params["features"] = ",".join(f.name for f in cfg.features)
    return params


def _log_day_inputs(cfg: PipelineConfig, day: str, plan: TrainingPlan) -> None:
    """Attach the build manifests and the day's validation results / Data Docs to the run."""
    import mlflow

    for d in sorted({*plan.train_days, day}):
        manifest = cfg.paths.manifest_path(d)
        if manifest.exists():
            mlflow.log_artifact(str(manifest), artifact_path="manifests")
    results = cfg.paths.validation_dir(day)
    if results.is_dir():
        mlflow.log_artifacts(str(results), artifact_path="validation")
    docs = cfg.paths.reports_root / "data_docs"
    if docs.is_dir():
        mlflow.log_artifacts(str(docs), artifact_path="data_docs")


# ---------------------------------------------------------------- evaluate


def evaluate_day(cfg: PipelineConfig, day: str, run_id: str) -> dict[str, Any]:
    """Score the challenger and the current champion on the same holdout; log both."""
    import mlflow

    from serving.plots import log_domain_plots
    from serving.pyfunc import load_serving_model
    from serving.registry import CHAMPION, alias_version, client_for
    from training.metrics import gate_conversions

    setup_mlflow(cfg)
    # The holdout must match what training left out: the run records whether it split day D.
    cold_start = mlflow.get_run(run_id).data.tags.get("cold_start") == "true"
    challenger = load_serving_model(f"runs:/{run_id}/model")
    challenger_metrics, table = _score(cfg, challenger, day, cold_start)
    client = client_for(cfg)
    champion_version = alias_version(client, cfg.mlflow.registered_model, CHAMPION)
    champion_metrics, champion_note = None, "no champion yet"
    if champion_version is not None:
        champion = load_serving_model(f"models:/{cfg.mlflow.registered_model}@{CHAMPION}")
        reason = _incompatibility(cfg, champion, *vocab_lists(cfg))
        if reason:
            champion_note = f"champion v{champion_version} not comparable: {reason}"
        else:
            champion_metrics, _ = _score(cfg, champion, day, cold_start)
            champion_note = f"champion v{champion_version} scored on the same holdout"
    conversions = gate_conversions(challenger_metrics)
    result = {
        "day": day,
        "run_id": run_id,
        "holdout": "split" if cold_start else "day",
        "challenger": challenger_metrics,
        "champion": champion_metrics,
        "champion_version": champion_version,
        "champion_note": champion_note,
        "conversions": conversions,
    }
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(_finite({f"holdout/{k}": v for k, v in _loggable(challenger_metrics).items()}))
        if champion_metrics:
            mlflow.log_metrics(_finite({f"champion_holdout/{k}": v for k, v in _loggable(champion_metrics).items()}))
        undefined = sorted(k for k, v in challenger_metrics.items() if v is None)
        mlflow.set_tag("holdout.undefined_metrics", ",".join(undefined)[:4900] or "none")
        mlflow.log_dict(result, EVAL_ARTIFACT)
        mlflow.log_table(table, "evaluation/per_domain.json")
        log_domain_plots(challenger_metrics, table, types=challenger.bundle.types,
                         scenarios=challenger.bundle.scenarios)
    return result


def _score(cfg: PipelineConfig, serving: Any, day: str, cold_start: bool) -> tuple[dict, Any]:
    """Holdout metrics and the per-domain table of one model (one prediction pass)."""
    from training.metrics import metrics_from_predictions, per_domain_table, predict_rows

    predictions = predict_rows(
        serving.model, cfg, [day],
        split="holdout" if cold_start else None,
        holdout_fraction=cfg.windows.cold_start_holdout_fraction,
    )
    if predictions.empty:
        raise ValueError(f"the holdout of {day} has no rows")
    types, scenarios = serving.bundle.types, serving.bundle.scenarios
    metrics = metrics_from_predictions(predictions, types, scenarios,
                                       cfg.evaluation.min_domain_conversions)
    return metrics, per_domain_table(predictions, types, scenarios)


def _incompatibility(cfg: PipelineConfig, champion: Any, types: list[str], scenarios: list[str]) -> str | None:
    """Why the champion can't score today's rows: changed hashing/features, or new domains."""
    if [vars(f) for f in champion.cfg.features] != [vars(f) for f in cfg.features]:
        return "feature fields or buckets changed"
    if champion.cfg.hashing != cfg.hashing:
        return "hashing changed"
    if len(types) > champion.model.n_types or len(scenarios) > champion.model.n_scenarios:
        return "new conversion types or scenarios appeared since it was trained"
    return None


def _loggable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Headline and per-type/scenario metrics; per-domain counts go to the table artifact."""
    return {k: v for k, v in metrics.items() if "_domain/" not in k}


# ---------------------------------------------------------------- without Airflow


def run_day(cfg: PipelineConfig, day: str, *, model_kind: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Every step for one day in this process (what the DAG does, minus the scheduler)."""
    build_day(cfg, day)
    validate_day(cfg, day)
    run_id = train_day(cfg, day, model_kind=model_kind)
    evaluation = evaluate_day(cfg, day, run_id)
    return gate_day(cfg, day, run_id, evaluation, dry_run=dry_run)


def load_evaluation(cfg: PipelineConfig, run_id: str) -> dict[str, Any]:
    """The evaluation an earlier `evaluate` step logged on the run (for a gate run by hand)."""
    import mlflow

    setup_mlflow(cfg)
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{EVAL_ARTIFACT}")
