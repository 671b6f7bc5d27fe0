"""A 3-day backfill in the embedded setup, executed by a real scheduler.

Airflow 3 backfills only queue runs; here a real scheduler, dag-processor and api-server
(LocalExecutor, SQLite) execute them. `mmn backfill --days` (what `make backfill` calls)
unpauses the DAG and queues the runs. The test then checks three partitions, three
registered versions in date order, and that promotions never overlapped and each gate
compared against the champion the run before it left.

It runs in its own lake, MLflow store and AIRFLOW_HOME, apart from the other e2e tests.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.config import load_config
from core.schedule import interval_start_for
from mmn.airflow_env import airflow_env

pytestmark = pytest.mark.e2e

DAYS = ["2026-11-01", "2026-11-02", "2026-11-03"]
DAG_ID = "mmn_daily_retrain"
TIMEOUT_S = 1500


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key, sub in {"RAW_ROOT": "raw", "LAKE_ROOT": "lake", "TRUTH_ROOT": "truth", "REPORTS_ROOT": "reports"}.items():
        env[f"MMN__PATHS__{key}"] = str(root / sub)
    env["MMN__MLFLOW__TRACKING_URI"] = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    env["MMN__MLFLOW__ARTIFACT_ROOT"] = str(root / "mlflow" / "artifacts")
    (root / "mlflow").mkdir(parents=True)
    home = root / "airflow"
    home.mkdir()
    env.update(airflow_env(load_config(environ=env), home=home))
    port = _free_port()
    env.update({
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
    })
    return env


def _dag_runs(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT run_id, run_type, state FROM dag_run WHERE dag_id = ? ORDER BY logical_date",
                            (DAG_ID,)).fetchall()


def _wait_for(predicate, what: str, timeout: float, services: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        dead = [p.args for p in services if p.poll() is not None]
        if dead:
            pytest.fail(f"Airflow component exited while waiting for {what}: {dead}")
        time.sleep(3)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def backfill(tmp_path_factory):
    root = tmp_path_factory.mktemp("backfill")
    env = _environment(root)
    cfg = load_config(environ=env)
    from simulation.generate_logs import generate

    generate(cfg, DAYS[0], len(DAYS))
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    logs = root / "service-logs"
    logs.mkdir()
    services = [
        subprocess.Popen(["airflow", component], env=env, stdout=(logs / f"{component}.log").open("w"),
                         stderr=subprocess.STDOUT, start_new_session=True)
        for component in ("api-server", "scheduler", "dag-processor")
    ]
    db = Path(env["AIRFLOW_HOME"]) / "airflow.db"
    try:
        def dag_parsed() -> bool:
            with sqlite3.connect(db) as conn:
                return bool(conn.execute("SELECT 1 FROM dag WHERE dag_id = ?", (DAG_ID,)).fetchall())

        _wait_for(dag_parsed, "the dag-processor to parse the DAG", 240, services)
        queued = subprocess.run([sys.executable, "-m", "mmn.cli", "backfill", "--days", f"{DAYS[0]}:{DAYS[-1]}"],
                                env=env, capture_output=True, text=True)
        assert queued.returncode == 0, queued.stdout + queued.stderr

        def backfill_finished() -> bool:
            runs = [r for r in _dag_runs(db) if r[1] == "backfill"]
            return len(runs) == len(DAYS) and all(r[2] in ("success", "failed") for r in runs)

        _wait_for(backfill_finished, "the backfill runs to finish", TIMEOUT_S, services)
    finally:
        for proc in services:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in services:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return cfg, db, queued.stdout


def test_backfill_cli_names_the_days_it_builds(backfill):
    cfg, _, output = backfill
    for day in DAYS:
        assert f"builds impression day {day}" in output
        assert interval_start_for(cfg, day).strftime("%Y-%m-%d %H:%M") in output


def test_three_runs_succeed_and_write_three_partitions(backfill):
    cfg, db, _ = backfill
    runs = [r for r in _dag_runs(db) if r[1] == "backfill"]
    assert [r[2] for r in runs] == ["success"] * len(DAYS), runs
    for day in DAYS:
        manifest = json.loads(cfg.paths.manifest_path(day).read_text())
        assert manifest["outputs"]["samples"] > 0
        assert any(cfg.paths.samples_dir(day).glob("*.parquet"))


def test_promotions_are_serialized_in_date_order(backfill):
    cfg, db, _ = backfill
    with sqlite3.connect(db) as conn:
        gates = conn.execute(
            "SELECT r.logical_date, t.start_date, t.end_date FROM task_instance t JOIN dag_run r "
            "ON t.dag_id = r.dag_id AND t.run_id = r.run_id "
            "WHERE t.dag_id = ? AND t.task_id = 'gate_and_promote' AND r.run_type = 'backfill' "
            "ORDER BY t.start_date", (DAG_ID,)).fetchall()
    assert len(gates) == len(DAYS)
    assert [g[0] for g in gates] == sorted(g[0] for g in gates), "gates ran out of date order"
    for earlier, later in zip(gates, gates[1:], strict=False):
        assert earlier[2] <= later[1], f"gate tasks overlapped: {earlier} / {later}"


def test_each_gate_compared_against_the_champion_the_day_before_left(backfill):
    cfg, _, _ = backfill
    from serving.registry import CHAMPION, alias_version, client_for

    champion = None
    versions = []
    for day in DAYS:
        summary = json.loads((cfg.paths.reports_root / "gate" / f"{day}.json").read_text())
        assert summary["day"] == day
        assert summary["champion_version"] == champion, summary
        versions.append(int(summary["version"]))
        if summary["decision"] == "promoted":
            champion = summary["version"]
    assert versions == sorted(versions) and len(set(versions)) == len(DAYS)
    assert champion is not None  # the first day clears the floor of 0
    assert alias_version(client_for(cfg), cfg.mlflow.registered_model, CHAMPION) == champion


def test_a_scheduled_run_without_raw_logs_fails_fast_with_a_clear_summary(backfill):
    """Unpausing lets the scheduler create the latest daily run; its day has no logs here."""
    cfg, db, _ = backfill
    scheduled = [r for r in _dag_runs(db) if r[1] == "scheduled"]
    if not scheduled:
        pytest.skip("the scheduler created no daily run for the latest interval")
    assert all(r[2] == "failed" for r in scheduled), scheduled
    lines = cfg.paths.failures_log.read_text().splitlines()
    assert any("task=check_raw_logs" in line and "no impressions to build" in line for line in lines), lines
