"""The embedded Airflow setup derived from the pipeline config, in one place.

Airflow reads its settings from the environment when it is first imported, so every
entry point (the `mmn airflow` wrapper, the demo, the tests) calls :func:`apply` first.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

from core.config import REPO_ROOT, PipelineConfig

AIRFLOW_HOME = REPO_ROOT / ".airflow"


def airflow_env(cfg: PipelineConfig, home: Path | None = None) -> dict[str, str]:
    """Environment for a project-local Airflow with SQLite and the spark_default connection."""
    home = home or Path(os.environ.get("AIRFLOW_HOME") or AIRFLOW_HOME)
    venv_bin = str(Path(sys.executable).parent)
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": str(cfg.airflow.parallelism),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(cfg.airflow.parallelism),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR": "False",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": cfg.spark.master}),
        "MMN_CONFIG": str(cfg.source),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "NO_PROXY": "*",
    }


def apply(cfg: PipelineConfig, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the embedded Airflow environment (before airflow is imported) and return it."""
    env = airflow_env(cfg)
    target = os.environ if environ is None else environ
    target.update(env)
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    return env
