"""The pipeline's steps, one function per DAG task, shared by the DAGs, the CLI and MLproject.

Keeping the logic here (not in dags/) means the DAG files stay cheap to parse and the
same code runs whether a step is triggered by Airflow, `mmn <stage>` or `mlflow run`.
Heavy imports (torch, mlflow, pyspark, great_expectations) happen inside the functions.

The steps live in one module each (mmn.plan, mmn.build, mmn.train, mmn.evaluate, mmn.gate);
this module gathers them under their historical names and runs a whole day in the DAG's
order (mmn.orchestration.STEPS) without Airflow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.config import PipelineConfig
from mmn.build import (
    BUILD_JOB,
    build_day,
    build_job_args,
    read_manifest,
    spark_submit_command,
    spark_submit_conf,
    validate_day,
)
from mmn.evaluate import EVAL_ARTIFACT, evaluate_day, load_evaluation
from mmn.gate import gate_day
from mmn.orchestration import STEPS
from mmn.plan import TrainingPlan, check_raw_logs, is_built, parse_day, resolve_day, training_plan
from mmn.tracking import git_commit, metrics_to_log, setup_mlflow, vocab_lists
from mmn.train import checkpoint_dir, example_records, train_day

__all__ = [
    "BUILD_JOB", "EVAL_ARTIFACT", "STEPS", "TrainingPlan", "build_day", "build_job_args",
    "check_raw_logs", "checkpoint_dir", "evaluate_day", "example_records", "gate_day",
    "git_commit", "is_built", "load_evaluation", "metrics_to_log", "parse_day", "read_manifest",
    "resolve_day", "run_day", "setup_mlflow", "spark_submit_command", "spark_submit_conf",
    "train_day", "training_plan", "validate_day", "vocab_lists",
]


def run_day(cfg: PipelineConfig, day: str, *, model_kind: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Every step for one day in this process: what the DAG does, in its order, minus the
    scheduler. Returns the gate's summary."""
    state: dict[str, Any] = {"day": day}

    def remember(key: str, value: Any) -> None:
        state[key] = value

    actions: dict[str, Callable[[], Any]] = {
        "resolve_day": lambda: remember("day", resolve_day(cfg, day, None)),
        "check_raw_logs": lambda: check_raw_logs(cfg, state["day"]),
        "build_samples": lambda: build_day(cfg, state["day"]),
        "validate": lambda: validate_day(cfg, state["day"]),
        "train": lambda: remember("run_id", train_day(cfg, state["day"], model_kind=model_kind)),
        "evaluate": lambda: remember("evaluation", evaluate_day(cfg, state["day"], state["run_id"])),
        "gate_and_promote": lambda: remember("gate", gate_day(
            cfg, state["day"], state["run_id"], state["evaluation"], dry_run=dry_run)),
    }
    for step in STEPS:
        actions[step]()
    return state["gate"]
