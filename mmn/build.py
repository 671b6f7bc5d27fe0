"""Build (Spark, through spark-submit) and validate (Great Expectations) one day's samples."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from core.config import REPO_ROOT, PipelineConfig
from core.threads import policy_for, process_env, spark_conf, spark_master

BUILD_JOB = REPO_ROOT / "spark_jobs" / "build_samples.py"


def spark_submit_command(cfg: PipelineConfig, day: str) -> list[str]:
    """The exact spark-submit invocation of the build job (used by CLI and tests)."""
    conf = [arg for key, value in spark_submit_conf(cfg).items() for arg in ("--conf", f"{key}={value}")]
    return [
        "spark-submit",
        "--master", spark_master(cfg.spark.master, policy_for(cfg).spark_cores),
        "--driver-memory", cfg.spark.driver_memory,
        *conf,
        str(BUILD_JOB),
        *build_job_args(cfg, day),
    ]


def spark_submit_conf(cfg: PipelineConfig) -> dict[str, str]:
    """Spark settings passed at submit time (the CLI's spark-submit and the DAG's operator),
    with the thread policy's (core.threads: the executors' OMP_WAIT_POLICY, and
    spark.cores.max on a cluster master)."""
    return {"spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions), **cfg.spark.jvm_conf(),
            **spark_conf(policy_for(cfg), cfg.spark.master)}


def build_job_args(cfg: PipelineConfig, day: Any) -> list[Any]:
    """The build job's arguments; ``day`` may be an Airflow XComArg, resolved at run time.

    The job runs with this effective config, not just its file: every env and ``--set``
    override goes along as a ``--set`` (so ``mmn build --set paths.lake_root=X`` builds into
    X), and ``--config-hash`` makes the job refuse to run if its config still differs."""
    overrides = [arg for item in cfg.source_overrides() for arg in ("--set", item)]
    return ["--day", day, "--config", str(cfg.source), *overrides, "--config-hash", cfg.config_hash()]


def build_day(cfg: PipelineConfig, day: str) -> dict[str, Any]:
    """Run the Spark build job for ``day`` through spark-submit; returns its manifest."""
    from mmn.airflow_env import airflow_env

    env = {**os.environ, **_spark_env(airflow_env(cfg)), **process_env(policy_for(cfg))}
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
