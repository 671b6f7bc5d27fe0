"""`mmn backfill` / `make backfill`: queue runs of the daily DAG for past dates.

Airflow 3 backfills are created in the metadata DB and executed by the scheduler, so a
scheduler (with its dag-processor and api-server: `make airflow-ui` starts all) must be
running and the DAG unpaused. Runs are capped at one at a time: each run's gate compares
against the champion the run before it promoted, so promotions must happen in date order.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from collections.abc import Sequence

from core.config import PipelineConfig
from core.schedule import cron_time, day_built_by, interval_start_for, parse_day

DAG_ID = "mmn_daily_retrain"
LOCK_RETRIES = 5


def range_for_days(cfg: PipelineConfig, first_day: str, last_day: str) -> tuple[str, str]:
    """Airflow's --from-date/--to-date that select exactly the runs building these impression days."""
    if parse_day(last_day) < parse_day(first_day):
        raise ValueError(f"backfill: {last_day} is before {first_day}")
    return interval_start_for(cfg, first_day).isoformat(), interval_start_for(cfg, last_day).isoformat()


def _utc(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def describe(cfg: PipelineConfig, from_date: str, to_date: str) -> list[str]:
    """One line per run whose logical date lies in [from_date, to_date] (Airflow's rule; a bare
    date means its midnight): the run's data interval and the impression day it builds."""
    first, last = _utc(from_date), _utc(to_date)
    hour, minute = cron_time(cfg.airflow.schedule)
    start = first.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if start < first:
        start += dt.timedelta(days=1)
    lines = []
    while start <= last:
        lines.append(f"  run for data interval starting {start:%Y-%m-%d %H:%M} -> builds impression day "
                     f"{day_built_by(cfg, start)}")
        start += dt.timedelta(days=1)
    return lines


def _airflow(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["airflow", *argv], capture_output=True, text=True)


def unpause(dag_id: str = DAG_ID) -> None:
    result = _airflow(["dags", "unpause", dag_id])
    if result.returncode != 0:
        raise RuntimeError(
            f"could not unpause {dag_id}: is the DAG parsed yet? Start Airflow first (`make airflow-ui`, or "
            f"`airflow scheduler` + `airflow dag-processor` + `airflow api-server`).\n{result.stderr.strip()[-800:]}")


def create_backfill(from_date: str, to_date: str, reprocess: str = "completed", max_active_runs: int = 1,
                    dag_id: str = DAG_ID) -> str:
    """Queue the backfill; returns Airflow's output. Raises with Airflow's message on refusal.

    On the embedded SQLite database the running scheduler and dag-processor hold the write
    lock now and then; Airflow creates a backfill in one transaction, rolled back whole
    when the lock times out, so trying again is safe.
    """
    argv = ["backfill", "create", "--dag-id", dag_id, "--from-date", from_date, "--to-date", to_date,
            "--reprocess-behavior", reprocess, "--max-active-runs", str(max_active_runs)]
    for attempt in range(1, LOCK_RETRIES + 1):
        result = _airflow(argv)
        output = (result.stdout + result.stderr).strip()
        if result.returncode == 0 and "Created backfill" in output:
            return output
        if "database is locked" not in output or attempt == LOCK_RETRIES:
            break
        print(f"metadata database busy (SQLite lock), trying again ({attempt}/{LOCK_RETRIES - 1})", flush=True)
        time.sleep(2 * attempt)
    raise RuntimeError(f"airflow backfill create did not queue runs:\n{output[-1500:]}")


def run_backfill(cfg: PipelineConfig, *, from_date: str | None, to_date: str | None,
                 days: tuple[str, str] | None = None, reprocess: str = "completed") -> int:
    from mmn.airflow_env import apply

    apply(cfg)
    if days:
        from_date, to_date = range_for_days(cfg, *days)
    if not (from_date and to_date):
        raise ValueError("backfill: give --from-date and --to-date (Airflow dates) or --days FIRST:LAST")
    plan = describe(cfg, from_date, to_date)
    if not plan:
        raise ValueError(f"backfill: no daily run has its logical date in {from_date} .. {to_date}")
    print(f"Backfill of {DAG_ID}, {from_date} .. {to_date}, one run at a time in date order:")
    print("\n".join(plan))
    # Queue first, then unpause: on SQLite a scheduler that has just seen the DAG unpaused
    # writes its own daily run at the same moment, and the backfill's inserts would wait on
    # the database lock.
    create_backfill(from_date, to_date, reprocess)
    unpause()
    print(f"{DAG_ID} is unpaused (its daily schedule is active too).")
    print("Queued. The running scheduler executes the runs; watch them in the Airflow UI "
          "(Dags > mmn_daily_retrain > Backfills) or with `airflow dags list-runs mmn_daily_retrain`.")
    return 0
