"""`make demo`: generate sample logs and run the daily DAG once per day, embedded mode.

Each run goes through Airflow for real (`dag.test()` on a project-local SQLite metadata
DB), with the Spark job submitted by spark-submit, GX validation, training, evaluation and
the MLflow registry gate. The logical date of each run is chosen so that the timetable's
data interval minus the label delay lands on the generated day: no date override needed.

The console gets one line per stage per day (its outcome and duration) and a summary table;
everything else (Spark, Airflow's task runner, library warnings, progress bars) goes to one
log file whose path is printed. The Airflow history tells the truth: a run's id names the
impression day it built, its start time is when it really started, each task's log is where
the UI looks for it, and the run's note names the day, the gate decision and the MLflow run.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from core.config import REPO_ROOT, PipelineConfig
from core.schedule import logical_date_for, parse_day
from mmn.airflow_env import apply

DAG_ID = "mmn_daily_retrain"


def migrate_airflow_db() -> None:
    subprocess.run(["airflow", "db", "migrate"], check=True, stdout=subprocess.DEVNULL)


def load_dag(dag_id: str = DAG_ID) -> Any:
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


class Console:
    """The demo's two outputs: the terminal (short lines) and the full log file.

    Inside :meth:`capture`, file descriptors 1 and 2 point at the log file, so whatever the
    process or its children (spark-submit) write lands there; :meth:`say` still reaches the
    terminal through a duplicate of the original stdout.
    """

    def __init__(self, log_path: Path, terminal: TextIO | None = None) -> None:
        self.log_path = log_path
        self._terminal = terminal
        self._log: TextIO | None = None

    def say(self, text: str = "", *, end: str = "\n") -> None:
        out = self._terminal or sys.stdout
        out.write(text + end)
        out.flush()

    @property
    def interactive(self) -> bool:
        out = self._terminal or sys.stdout
        return bool(getattr(out, "isatty", lambda: False)())

    def offset(self) -> int:
        """The log file's current size (what was written so far)."""
        sys.stdout.flush()
        sys.stderr.flush()
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def since(self, offset: int) -> str:
        """What the log file got after ``offset``."""
        if self.offset() <= offset:
            return ""
        with self.log_path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")

    @contextmanager
    def capture(self) -> Iterator[Console]:
        """Send fds 1 and 2 (this process's and its children's output) to the log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        self._terminal = os.fdopen(os.dup(1), "w", buffering=1)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        # Python-level streams too, in case they were replaced (they then bypass fds 1 and 2).
        streams = sys.stdout, sys.stderr
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
        try:
            yield self
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.close()
            sys.stdout, sys.stderr = streams
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            self._terminal.close()
            self._terminal = None


@dataclass
class DayRun:
    """One impression day's DAG run as the demo saw it."""

    day: str
    state: str
    run_id: str
    tasks: list[tuple[str, str, float]] = field(default_factory=list)  # task, state, seconds
    note: str = ""


def demo_run_id(day: str, now: dt.datetime | None = None) -> str:
    """A run id naming the impression day the run builds (and when it was started)."""
    now = now or dt.datetime.now(dt.UTC)
    return f"impression_day__{day}__{now:%Y%m%dT%H%M%S}"


def task_log_path(ti: Any) -> Path:
    """Where Airflow's UI looks for a task instance's log (logging.log_filename_template
    under logging.base_log_folder)."""
    import jinja2
    from airflow.configuration import conf

    template = conf.get("logging", "log_filename_template")
    relative = jinja2.Template(template).render(ti=ti, try_number=ti.try_number)
    return Path(conf.get("logging", "base_log_folder")) / relative


def _state(value: Any) -> str:
    return str(getattr(value, "value", value) or "none").split(".")[-1]


def run_day(cfg: PipelineConfig, dag: Any, day: str, console: Console) -> DayRun:
    """Run the DAG for one impression day with ``dag.test()`` and make its history honest:
    the run id names the day, the start time is real, each task's captured output is its
    log file, and the run's note names the day, the decision and the MLflow run."""
    import airflow.sdk.definitions.dag as dag_module
    from airflow.models.dagrun import DagRun

    logical = logical_date_for(cfg, day)
    started = dt.datetime.now(dt.UTC)
    run_id = demo_run_id(day, started)
    tasks: list[tuple[str, str, float]] = []
    original_run_task = dag_module._run_task

    def timed_run_task(*, ti: Any, task: Any, run_triggerer: bool = False) -> Any:
        offset, began = console.offset(), time.monotonic()
        if console.interactive:
            console.say(f"  {day}  {ti.task_id:<17} running…", end="\r")
        try:
            return original_run_task(ti=ti, task=task, run_triggerer=run_triggerer)
        finally:
            seconds = time.monotonic() - began
            state = _state(ti.state)
            tasks.append((ti.task_id, state, seconds))
            console.say(f"  {day}  {ti.task_id:<17} {state:<8} {seconds:7.1f} s")
            path = task_log_path(ti)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(console.since(offset))

    original_run_id = DagRun.generate_run_id
    DagRun.generate_run_id = classmethod(lambda cls, **_: run_id)  # type: ignore[method-assign]
    dag_module._run_task = timed_run_task
    try:
        dagrun = dag.test(logical_date=logical, run_after=started)
    finally:
        dag_module._run_task = original_run_task
        DagRun.generate_run_id = original_run_id  # type: ignore[method-assign]
    state = _state(getattr(dagrun, "state", "unknown"))
    ran = {name for name, _, _ in tasks}
    for ti in sorted(dagrun.get_task_instances(), key=lambda t: t.task_id):
        if ti.task_id not in ran:  # never started: upstream_failed, skipped
            tasks.append((ti.task_id, _state(ti.state), 0.0))
            console.say(f"  {day}  {ti.task_id:<17} {_state(ti.state)}")
    note = day_note(cfg, day, state, since=started)
    _record_run(run_id, started, note)
    return DayRun(day=day, state=state, run_id=run_id, tasks=tasks, note=note)


def day_note(cfg: PipelineConfig, day: str, state: str, since: dt.datetime | None = None) -> str:
    """The DAG run's note: the impression day, the gate decision and the MLflow run."""
    from mmn.orchestration import run_note

    gate = _gate(cfg, day, since)
    if not gate or gate.get("run_id") is None:
        return f"Impression day **{day}**: run {state}; no gate decision (see the failed task's log)."
    return run_note(gate, _mlflow_url(cfg, gate["run_id"]))


def _mlflow_url(cfg: PipelineConfig, run_id: str) -> str | None:
    try:
        from mlflow import MlflowClient

        from mmn.orchestration import mlflow_run_url
        from mmn.tracking import setup_mlflow

        setup_mlflow(cfg)
        return mlflow_run_url(cfg, MlflowClient().get_run(run_id).info.experiment_id, run_id)
    except Exception:  # noqa: BLE001 - the note is a convenience; the run stands without it
        return None


def _record_run(run_id: str, started: dt.datetime, note: str) -> None:
    """Give the DAG run its real start time (``dag.test`` records the logical date) and note."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run = session.scalar(select(DagRun).where(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id))
        if run is None:
            return
        run.start_date = started
        run.note = note


def _gate(cfg: PipelineConfig, day: str, since: dt.datetime | None = None) -> dict[str, Any]:
    """The day's latest gate summary; {} when there is none written after ``since``."""
    path = cfg.paths.reports_root / "gate" / f"{day}.json"
    if not path.exists() or (since is not None and path.stat().st_mtime < since.timestamp()):
        return {}
    return json.loads(path.read_text())


def run_demo(cfg: PipelineConfig, start: str | None = None, days: int = 3) -> int:
    """Generate ``days`` days of logs and run the daily DAG for each; 0 when all succeed."""
    began = time.monotonic()
    apply(cfg)
    first = parse_day(start or cfg.airflow.start_date)
    day_list = [(first + dt.timedelta(days=i)).isoformat() for i in range(days)]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    console = Console(cfg.paths.reports_root / "logs" / f"demo-{stamp}.log")
    console.say(f"Full log (Spark, Airflow, training): {console.log_path}")
    rows: list[dict[str, Any]] = []
    with console.capture():
        t0 = time.monotonic()
        from simulation.generate_logs import generate

        generate(cfg, day_list[0], days)
        console.say(f"  generate {days} days of raw logs from {day_list[0]}  {time.monotonic() - t0:7.1f} s")
        t0 = time.monotonic()
        migrate_airflow_db()
        dag = load_dag()
        console.say(f"  airflow db migrate, load the DAG       {time.monotonic() - t0:7.1f} s")
        for day in day_list:
            logical = logical_date_for(cfg, day)
            console.say(f"\nimpression day {day} (DAG {DAG_ID}, logical date {logical:%Y-%m-%d %H:%M} UTC)")
            day_began = dt.datetime.now(dt.UTC)
            result = run_day(cfg, dag, day, console)
            rows.append({**_gate(cfg, day, day_began), "day": day, "state": result.state,
                         "run_id": result.run_id})
            if result.state != "success":
                failed = [name for name, state, _ in result.tasks if state == "failed"]
                _print_table(console, rows)
                console.say(f"\nDAG run {result.run_id} ended {result.state} (failed: {', '.join(failed) or '?'}); "
                            f"one line per failure in {cfg.paths.failures_log}; full log {console.log_path}")
                return 1
    _print_table(console, rows)
    console.say(f"\nDemo finished in {time.monotonic() - began:.0f} s. Full log: {console.log_path}")
    console.say("MLflow UI:  make mlflow-ui   -> http://127.0.0.1:5000 (experiment "
                f"'{cfg.mlflow.experiment}', model '{cfg.mlflow.registered_model}')")
    console.say("Airflow UI: make airflow-ui  -> http://127.0.0.1:8080 (user admin, password in "
                ".airflow/simple_auth_manager_passwords.json.generated)")
    return 0


def _print_table(console: Console, rows: list[dict[str, Any]]) -> None:
    metric = rows[0].get("metric") or "metric"
    console.say(f"\n day         dag run   holdout {metric}  champion   decision")
    for r in rows:
        chal = "n/a" if r.get("challenger") is None else f"{r['challenger']:.4f}"
        champ = "-" if r.get("champion") is None else f"{r['champion']:.4f}"
        version = f" (v{r['version']})" if r.get("version") else ""
        console.say(f" {r['day']}  {r['state']:<8}  {chal:>10}  {champ:>8}   "
                    f"{r.get('decision', '-')}{version}: {r.get('reason', '')}")


if __name__ == "__main__":
    from core.config import load_config

    sys.exit(run_demo(load_config()))
