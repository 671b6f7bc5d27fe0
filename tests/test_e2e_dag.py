"""End to end: the real DAG under `dag.test()` on tiny generated logs, two consecutive days.

Real components throughout: spark-submit (local[2]) builds the Parquet partition, GX
validates it, PyTorch trains MMN, MLflow (SQLite store) records the run and the registry
carries the aliases. Day 2's gate must compare against day 1's champion.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from core.config import load_config
from core.schedule import logical_date_for
from mmn.demo import Console, load_dag, run_day, task_log_path

pytestmark = pytest.mark.e2e

DAYS = ["2026-11-01", "2026-11-02"]


@pytest.fixture(scope="module")
def day_runs(tmp_path_factory):
    """The two days run the way `make demo` runs them (mmn.demo.run_day: dag.test with an
    honest history, output captured into a log file)."""
    cfg = load_config()
    from simulation.generate_logs import generate

    counts = generate(cfg, DAYS[0], len(DAYS))
    subprocess.run(["airflow", "db", "migrate"], check=True, capture_output=True)
    dag = load_dag()
    console = Console(tmp_path_factory.mktemp("demo") / "demo.log")
    began = dt.datetime.now(dt.UTC)
    with console.capture():
        runs = {day: run_day(cfg, dag, day, console) for day in DAYS}
    return cfg, counts, runs, began


@pytest.fixture(scope="module")
def daily_runs(day_runs):
    cfg, counts, runs, _ = day_runs
    return cfg, counts, {day: run.state for day, run in runs.items()}


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
    from serving.registry import CHAMPION, PREVIOUS, alias_version, client_for

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


def test_airflow_history_names_the_day_real_times_logs_and_notes(day_runs):
    """Issue 18 item 4: run ids name the impression day, the start is the real one (not the
    logical date), every task's log is where the UI reads it, the note names the day, the
    decision and the MLflow run; the gate task's log links its MLflow run."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    cfg, _, runs, began = day_runs
    with create_session() as session:
        for day, result in runs.items():
            assert day in result.run_id
            run = session.scalar(select(DagRun).where(DagRun.run_id == result.run_id))
            assert run.start_date >= began - dt.timedelta(seconds=5)
            assert run.end_date - run.start_date < dt.timedelta(hours=1)
            decision = _gate_summary(cfg, day)["decision"]
            assert day in run.note and decision in run.note and "MLflow run: http" in run.note
            tis = {ti.task_id: ti for ti in run.get_task_instances(session=session)}
            assert {name for name, _, _ in result.tasks} == set(tis)
            for ti in tis.values():
                assert task_log_path(ti).is_file(), ti.task_id
            gate_log = task_log_path(tis["gate_and_promote"]).read_text()
            assert f"/runs/{_gate_summary(cfg, day)['run_id']}" in gate_log


def test_mlflow_run_reads_at_a_glance(daily_runs):
    """Issue 18 item 2 on the real DAG: headline metrics, the description, the day's Data Docs page."""
    cfg, _, _ = daily_runs
    from serving.registry import client_for

    client = client_for(cfg)
    second = _gate_summary(cfg, DAYS[1])
    run = client.get_run(second["run_id"])
    assert {"auc_type", "auc_overall", "champ_auc_type", "gate_margin"} <= set(run.data.metrics)
    assert len(run.data.metrics) < 60, sorted(run.data.metrics)
    assert DAYS[1] in run.data.tags["mlflow.note.content"]
    assert second["decision"] in run.data.tags["mlflow.note.content"]
    docs = [a.path for a in client.list_artifacts(second["run_id"], "data_docs")]
    assert docs == [f"data_docs/dt={DAYS[1]}.html"]


# ---------------------------------------------------------------- serving the champion


def _raw_records(cfg, day, n):
    """The day's first ``n`` raw impression records, as a client would send them."""
    path = sorted(cfg.paths.raw_dir("impressions", day).glob("*.jsonl*"))[0]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh, strict=False)]


BAD_RECORDS = [
    {"conversion_type": "no_such_type", "display_scenario": "x"},
    {"display_scenario": "also_missing_type"},
    {"conversion_type": None, "display_scenario": None, "user_age": "forty"},
]


def test_pyfunc_on_raw_records_equals_model_on_spark_rows(daily_runs):
    """Serving hashes raw records exactly as the Spark job did: same predictions."""
    cfg, _, _ = daily_runs
    from serving.pyfunc import load_serving_model

    serving = load_serving_model(f"models:/{cfg.mlflow.registered_model}@champion")
    records = _raw_records(cfg, DAYS[1], 300)
    served = serving.predict_records(records)
    assert served["error"].isna().all(), served["error"].dropna().head()

    rows = pq.read_table(cfg.paths.samples_dir(DAYS[1])).to_pandas().set_index("impression_id")
    rows = rows.loc[[r["impression_id"] for r in records]]
    features = torch.tensor(rows[cfg.feature_columns].to_numpy(), dtype=torch.long)
    with torch.no_grad():
        p_ctr, p_cvr = serving.model(features, torch.tensor(rows["type_id"].to_numpy()),
                                     torch.tensor(rows["scenario_id"].to_numpy()))
    assert np.allclose(served["p_cvr"].to_numpy(), p_cvr.numpy(), atol=1e-5)
    assert np.allclose(served["p_ctr"].to_numpy(), p_ctr.numpy(), atol=1e-5)


def test_bad_records_get_a_clear_error_each(daily_runs):
    cfg, _, _ = daily_runs
    from serving.pyfunc import load_serving_model

    serving = load_serving_model(f"models:/{cfg.mlflow.registered_model}@champion")
    out = serving.predict_records([*_raw_records(cfg, DAYS[1], 2), *BAD_RECORDS])
    assert out["error"].iloc[:2].isna().all()
    errors = out["error"].iloc[2:].tolist()
    assert "unknown conversion_type 'no_such_type'" in errors[0]
    assert "missing required field 'conversion_type'" in errors[1]
    assert "missing required field" in errors[2]
    assert out["p_cvr"].iloc[2:].isna().all()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_like_in_process(daily_runs):
    """`mlflow models serve -m models:/<name>@champion --env-manager local` on 127.0.0.1."""
    cfg, _, _ = daily_runs
    from serving.pyfunc import load_serving_model

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
           f"models:/{cfg.mlflow.registered_model}@champion", "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"{base}/ping", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("model server did not come up within 180 s")
        records = [*_raw_records(cfg, DAYS[1], 20), *BAD_RECORDS]
        body = json.dumps({"dataframe_records": records}).encode()
        req = urllib.request.Request(f"{base}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    expected = load_serving_model(f"models:/{cfg.mlflow.registered_model}@champion").predict_records(records)
    assert len(answer) == len(records)
    for got, (_, want) in zip(answer, expected.iterrows(), strict=True):
        assert (got["error"] is None) == pd.isna(want["error"])
        if got["error"] is None:
            assert abs(got["p_cvr"] - want["p_cvr"]) < 1e-6
            assert abs(got["p_ctcvr"] - want["p_ctcvr"]) < 1e-6
        else:
            assert got["error"] == want["error"]


# ---------------------------------------------------------------- a bad day stops the DAG

BAD_DAY = "2026-11-03"


@pytest.fixture(scope="module")
def bad_day_run(daily_runs):
    """Day 3's logs hold a third of the usual impressions: validation must stop the run."""
    cfg, _, _ = daily_runs
    from serving.registry import CHAMPION, alias_version, client_for
    from simulation.generate_logs import generate

    champion_before = alias_version(client_for(cfg), cfg.mlflow.registered_model, CHAMPION)
    generate(cfg, BAD_DAY, 1, impressions_per_day=cfg.generator.impressions_per_day // 3)
    dagrun = load_dag().test(logical_date=logical_date_for(cfg, BAD_DAY))
    states = {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}
    return cfg, dagrun, states, champion_before


def test_validation_failure_stops_training_and_keeps_the_champion(bad_day_run):
    cfg, dagrun, states, champion_before = bad_day_run
    from serving.registry import CHAMPION, alias_version, client_for

    assert "failed" in str(dagrun.state)
    assert "success" in states["build_samples"]
    assert "failed" in states["validate"]
    for task in ("train", "evaluate", "gate_and_promote"):
        assert "upstream_failed" in states[task], states
    assert not (cfg.paths.reports_root / "gate" / f"{BAD_DAY}.json").exists()
    assert alias_version(client_for(cfg), cfg.mlflow.registered_model, CHAMPION) == champion_before
    results = json.loads((cfg.paths.validation_dir(BAD_DAY) / "results.json").read_text())
    assert results["success"] is False


def test_failure_summary_names_task_date_and_failed_expectation(bad_day_run):
    cfg, _, _, _ = bad_day_run
    lines = cfg.paths.failures_log.read_text().splitlines()
    summary = [line for line in lines if "task=validate" in line and BAD_DAY in line]
    assert summary, lines
    assert "ValidationFailed" in summary[-1] and "row_count" in summary[-1]
