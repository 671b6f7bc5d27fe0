"""Manual model comparison: train the chosen model kinds on the same window and holdout
(seeds fixed) and log them into one MLflow experiment, with the MMN paper's per-type and
per-scenario CVR AUC table and MMN's gain-over-DNN heatmap on a parent run.

The day's samples must already be built (by mmn_daily_retrain). Logic: mmn.compare.
"""

from __future__ import annotations

import datetime as dt

import pendulum
from airflow.sdk import Param, dag, task

from core.config import load_config
from mmn.model_kinds import COMPARISON_KINDS
from mmn.orchestration import default_args

CFG = load_config()


@dag(
    dag_id="mmn_model_comparison",
    schedule=None,
    start_date=pendulum.parse(CFG.airflow.start_date, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={**default_args(CFG), "retries": 0},
    params={
        "date": Param(type="string", format="date", description="Holdout day (already built)."),
        "kinds": Param(["mmn", "dnn", "star", "lightgbm", "lr_crosses"], type="array",
                       items={"type": "string", "enum": list(COMPARISON_KINDS)}, minItems=1,
                       description="Model kinds to train and compare."),
        "seeds": Param([CFG.training.seed], type="array", items={"type": "integer"}, minItems=1),
    },
    tags=["mmn", "comparison"],
    doc_md=__doc__,
)
def mmn_model_comparison() -> None:
    @task(execution_timeout=dt.timedelta(minutes=CFG.airflow.train_timeout_minutes))
    def compare_models(**context) -> dict:
        from mmn.compare import compare

        params = context["params"]
        result = compare(load_config(), params["date"], list(params["kinds"]), seeds=tuple(params["seeds"]))
        return {"comparison_id": result.comparison_id, "parent_run_id": result.parent_run_id}

    compare_models()


comparison_dag = mmn_model_comparison()
