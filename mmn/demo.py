"""`make demo`: generate sample logs and run the daily DAG once per day, embedded mode.

Each run goes through Airflow for real (`dag.test()` on a project-local SQLite metadata
DB), with the Spark job submitted by spark-submit, GX validation, training, evaluation and
the MLflow registry gate. The logical date of each run is chosen so that the timetable's
data interval minus the label delay lands on the generated day: no date override needed.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import subprocess
import sys
import time
from typing import Any

from core.config import REPO_ROOT, PipelineConfig
from core.schedule import logical_date_for
from mmn.airflow_env import apply


def migrate_airflow_db() -> None:
    print("== airflow db migrate (project-local SQLite)", flush=True)
    subprocess.run(["airflow", "db", "migrate"], check=True, stdout=subprocess.DEVNULL)


def load_dag(dag_id: str = "mmn_daily_retrain") -> Any:
    """Import the DAG file the way the dag-processor would, and return the DAG object."""
    path = REPO_ROOT / "dags" / f"{dag_id}.py"
    spec = importlib.util.spec_from_file_location(f"dags_{dag_id}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    from airflow.sdk import DAG

    dags = [v for v in vars(module).values() if isinstance(v, DAG) and v.dag_id == dag_id]
    if not dags:
        raise RuntimeError(f"{path} defines no DAG {dag_id!r}")
    return dags[0]


def run_demo(cfg: PipelineConfig, start: str | None = None, days: int = 3) -> int:
    began = time.monotonic()
    apply(cfg)
    first = dt.date.fromisoformat(start or cfg.airflow.start_date)
    day_list = [(first + dt.timedelta(days=i)).isoformat() for i in range(days)]
    print(f"== generating {days} days of raw logs from {day_list[0]} into {cfg.paths.raw_root}", flush=True)
    from simulation.generate_logs import generate

    generate(cfg, day_list[0], days)
    migrate_airflow_db()
    dag = load_dag()
    rows = []
    for day in day_list:
        logical = logical_date_for(cfg, day)
        print(f"\n== DAG mmn_daily_retrain, logical date {logical:%Y-%m-%d %H:%M} -> impression day {day}", flush=True)
        dagrun = dag.test(logical_date=logical)
        state = str(getattr(dagrun, "state", "unknown"))
        rows.append(_day_row(cfg, day, state))
        if "success" not in state:
            _print_table(rows)
            print(f"\nDAG run for {day} ended {state}; failures are summarised in {cfg.paths.failures_log}")
            return 1
    _print_table(rows)
    print(f"\nDemo finished in {time.monotonic() - began:.0f} s.")
    print("Open the MLflow UI:  make mlflow-ui   (http://127.0.0.1:5000, experiment "
          f"'{cfg.mlflow.experiment}', model '{cfg.mlflow.registered_model}')")
    print("Open the Airflow UI: make airflow-ui  (http://127.0.0.1:8080; the admin password is printed "
          "by `airflow standalone` and stored under .airflow/)")
    return 0


def _day_row(cfg: PipelineConfig, day: str, state: str) -> dict[str, Any]:
    path = cfg.paths.reports_root / "gate" / f"{day}.json"
    gate = json.loads(path.read_text()) if path.exists() else {}
    return {**gate, "day": day, "state": state}


def _print_table(rows: list[dict[str, Any]]) -> None:
    print("\n day         dag run   holdout " + (rows[0].get("metric") or "metric") + "  champion   decision")
    for r in rows:
        chal = "n/a" if r.get("challenger") is None else f"{r['challenger']:.4f}"
        champ = "-" if r.get("champion") is None else f"{r['champion']:.4f}"
        version = f" (v{r['version']})" if r.get("version") else ""
        print(f" {r['day']}  {r['state'].split('.')[-1]:<8}  {chal:>10}  {champ:>8}   "
              f"{r.get('decision', '-')}{version}: {r.get('reason', '')}")


if __name__ == "__main__":
    from core.config import load_config

    sys.exit(run_demo(load_config()))
