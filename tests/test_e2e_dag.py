"""End to end: the real DAG under `dag.test()` on tiny generated logs, two consecutive days.

Real components throughout: spark-submit (local[2]) builds the Parquet partition, GX
validates it, PyTorch trains MMN, MLflow (SQLite store) records the run and the registry
carries the aliases. Day 2's gate must compare against day 1's champion.
"""

from __future__ import annotations

import json
import subprocess

import pyarrow.parquet as pq
import pytest

from mmn.config import load_config
from mmn.demo import load_dag, logical_date_for

pytestmark = pytest.mark.e2e

DAYS = ["2026-11-01", "2026-11-02"]


@pytest.fixture(scope="module")
def daily_runs():
    cfg = load_config()
    from spark_jobs.generate_logs import generate

    counts = generate(cfg, DAYS[0], len(DAYS))
    subprocess.run(["airflow", "db", "migrate"], check=True, capture_output=True)
    dag = load_dag()
    states = {}
    for day in DAYS:
        dagrun = dag.test(logical_date=logical_date_for(cfg, day))
        states[day] = str(dagrun.state)
    return cfg, counts, states


def _gate_summary(cfg, day):
    return json.loads((cfg.paths.reports_root / "gate" / f"{day}.json").read_text())


def test_both_days_succeed_on_the_days_the_timetable_maps_to(daily_runs):
    cfg, _, states = daily_runs
    assert all("success" in s for s in states.values()), states
    # The run's data interval minus the label delay is the impression day it built.
    assert [_gate_summary(cfg, d)["day"] for d in DAYS] == DAYS


def test_partition_has_one_row_per_generated_impression(daily_runs):
    cfg, counts, _ = daily_runs
    for day in DAYS:
        table = pq.read_table(cfg.paths.samples_dir(day))
        manifest = json.loads(cfg.paths.manifest_path(day).read_text())
        assert table.num_rows == manifest["outputs"]["samples"]
        assert table.num_rows == counts["impressions"][day]
        assert set(cfg.feature_columns) <= set(table.column_names)


def test_validation_succeeded(daily_runs):
    cfg, _, _ = daily_runs
    for day in DAYS:
        results = json.loads((cfg.paths.validation_dir(day) / "results.json").read_text())
        assert results["success"] is True


def test_mlflow_run_has_holdout_metrics_and_champion_alias(daily_runs):
    cfg, _, _ = daily_runs
    from training.registry import CHAMPION, PREVIOUS, alias_version, client_for

    client = client_for(cfg)
    first, second = (_gate_summary(cfg, d) for d in DAYS)
    run = client.get_run(first["run_id"])
    assert "holdout/cvr_auc" in run.data.metrics
    assert "holdout/ctr_auc" in run.data.metrics
    assert run.data.tags["data_date"] == DAYS[0]
    assert first["decision"] == "promoted" and first["version"] == "1"

    # Day 2 was gated against day 1's champion on the same holdout.
    assert second["champion_version"] == "1"
    assert second["champion"] is not None
    champion = alias_version(client, cfg.mlflow.registered_model, CHAMPION)
    if second["decision"] == "promoted":
        assert champion == second["version"]
        assert alias_version(client, cfg.mlflow.registered_model, PREVIOUS) == "1"
    else:
        assert champion == "1"
        tags = client.get_model_version(cfg.mlflow.registered_model, second["version"]).tags
        assert tags["status"] == "rejected" and tags["gate.reason"]
