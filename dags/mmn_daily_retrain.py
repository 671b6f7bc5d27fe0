"""Daily MMN retrain: check the raw logs -> build the day's samples (Spark) -> validate (GX) -> train -> evaluate
on the holdout day -> gate and promote to the ``champion`` alias (MLflow registry).

The data interval is the previous day (CronDataIntervalTimetable); the impression day built
is that day minus the label delay, so its conversions have landed. Manual triggers take
validated params (date, model kind, window, gate overrides, dry run). All logic lives in
``mmn.tasks``; this file only wires tasks together, in the order of
``mmn.orchestration.STEPS`` (which ``mmn.tasks.run_day`` follows too).
"""

from __future__ import annotations

import datetime as dt

import pendulum
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import chain, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

from core.config import load_config
from mmn.orchestration import (
    DAILY_DESCRIPTION,
    STEPS,
    TASK_DOCS,
    champion_asset,
    daily_params,
    default_args,
    samples_asset,
)
from mmn.tasks import BUILD_JOB, build_job_args, spark_submit_conf

CFG = load_config()


@dag(
    dag_id="mmn_daily_retrain",
    description=DAILY_DESCRIPTION,
    schedule=CronDataIntervalTimetable(CFG.airflow.schedule, timezone="UTC"),
    start_date=pendulum.parse(CFG.airflow.start_date, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=daily_params(CFG),
    default_args=default_args(CFG),
    tags=["mmn", "cvr", "daily"],
    doc_md=__doc__,
)
def mmn_daily_retrain() -> None:
    @task(retries=0, doc_md=TASK_DOCS["resolve_day"])
    def resolve_day(**context) -> str:
        from mmn.tasks import resolve_day as resolve

        return resolve(load_config(), context["params"].get("date"), context.get("data_interval_start"))

    @task(retries=0, doc_md=TASK_DOCS["check_raw_logs"])
    def check_raw_logs(day: str) -> int:
        from mmn.tasks import check_raw_logs as check

        return check(load_config(), day)

    day = resolve_day()

    build = SparkSubmitOperator(
        task_id="build_samples",
        conn_id="spark_default",
        application=str(BUILD_JOB),
        application_args=build_job_args(CFG, day),
        name="mmn-build-samples",
        driver_memory=CFG.spark.driver_memory,
        conf=spark_submit_conf(CFG),
        execution_timeout=dt.timedelta(minutes=CFG.airflow.spark_timeout_minutes),
        outlets=[samples_asset(CFG)],
        doc_md=TASK_DOCS["build_samples"],
    )

    @task(retries=0, doc_md=TASK_DOCS["validate"])
    def validate(day: str) -> dict:
        from mmn.tasks import validate_day

        return validate_day(load_config(), day)

    @task(execution_timeout=dt.timedelta(minutes=CFG.airflow.train_timeout_minutes),
          doc_md=TASK_DOCS["train"])
    def train(day: str, **context) -> str:
        from mmn.tasks import train_day

        params = context["params"]
        return train_day(load_config(), day, model_kind=params["model_kind"],
                         window_days=params["train_window_days"], ssim=params["ssim"])

    @task(doc_md=TASK_DOCS["evaluate"])
    def evaluate(day: str, mlflow_run_id: str) -> dict:
        from mmn.tasks import evaluate_day

        return evaluate_day(load_config(), day, mlflow_run_id)

    @task(outlets=[champion_asset(CFG)], doc_md=TASK_DOCS["gate_and_promote"])
    def gate_and_promote(day: str, mlflow_run_id: str, evaluation: dict, **context) -> dict:
        import logging

        from mmn.tasks import gate_day
        from mmn.tracking import record_gate

        cfg, params = load_config(), context["params"]
        summary = gate_day(cfg, day, mlflow_run_id, evaluation, dry_run=params["dry_run"],
                           min_delta=params["min_delta"], floor=params["floor"])
        url = record_gate(cfg, summary)  # the run's description, the version's description
        logging.getLogger(__name__).info("gate for %s: %s; MLflow run: %s", day, summary["decision"], url)
        return {**summary, "mlflow_run_url": url}

    mlflow_run_id = train(day)
    evaluation = evaluate(day, mlflow_run_id)
    steps = {
        "resolve_day": day,
        "check_raw_logs": check_raw_logs(day),
        "build_samples": build,
        "validate": validate(day),
        "train": mlflow_run_id,
        "evaluate": evaluation,
        "gate_and_promote": gate_and_promote(day, mlflow_run_id, evaluation),
    }
    chain(*(steps[name] for name in STEPS))  # the order written once, shared with run_day

daily_retrain_dag = mmn_daily_retrain()
