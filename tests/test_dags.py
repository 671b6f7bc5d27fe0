"""DAG integrity: imports cleanly, the task graph, params validation, cheap to parse."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
from airflow.sdk.definitions.param import ParamValidationError

from core.config import REPO_ROOT, load_config
from mmn.demo import load_dag


@pytest.fixture(scope="module")
def dag():
    return load_dag("mmn_daily_retrain")


def test_task_graph(dag):
    downstream = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert downstream == {
        "resolve_day": ["build_samples", "check_raw_logs", "evaluate", "gate_and_promote", "train", "validate"],
        "check_raw_logs": ["build_samples"],
        "build_samples": ["validate"],
        "validate": ["train"],
        "train": ["evaluate", "gate_and_promote"],
        "evaluate": ["gate_and_promote"],
        "gate_and_promote": [],
    }
    assert dag.catchup is False and dag.max_active_runs == 1
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"


def _with(dag, conf):
    """The params a manual trigger with ``conf`` would get (as the API merges them)."""
    params = copy.deepcopy(dag.params)
    params.update(conf)
    return params


def test_params_accept_good_and_reject_bad_input(dag):
    resolved = _with(dag, {"date": "2026-11-02", "model_kind": "dnn", "dry_run": True}).validate()
    assert resolved["model_kind"] == "dnn" and resolved["train_window_days"] >= 1
    for bad in ({"model_kind": "xgboost"}, {"train_window_days": 0}, {"floor": 2},
                {"date": "yesterday"}, {"dry_run": "maybe"}):
        name = next(iter(bad))
        with pytest.raises(ParamValidationError, match=f"Invalid input for param {name}"):
            _with(dag, bad).validate()


def test_parsing_the_dag_file_is_cheap():
    """The dag-processor re-parses often: with airflow imported, the file itself takes < 2 s."""
    code = (
        "import time, runpy, airflow.sdk, airflow.providers.apache.spark.operators.spark_submit\n"
        "t = time.perf_counter()\n"
        f"runpy.run_path({str(REPO_ROOT / 'dags' / 'mmn_daily_retrain.py')!r})\n"
        "print(time.perf_counter() - t)\n"
        "import sys; assert 'torch' not in sys.modules and 'pyspark' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 2.0


def test_comparison_dag_validates_model_kinds():
    comparison = load_dag("mmn_model_comparison")
    assert [t.task_id for t in comparison.tasks] == ["compare_models"]
    _with(comparison, {"date": "2026-11-02", "kinds": ["mmn", "dnn"]}).validate()
    with pytest.raises(ParamValidationError, match="Invalid input for param kinds"):
        _with(comparison, {"date": "2026-11-02", "kinds": ["mmn", "gbdt"]}).validate()


def test_the_dag_submits_the_same_build_job_as_the_cli(dag):
    """One definition of the job's arguments and submit-time conf serves the DAG and `mmn build`."""
    from airflow.sdk.definitions.xcom_arg import XComArg

    from core.config import load_config
    from mmn.tasks import BUILD_JOB, build_job_args, spark_submit_command, spark_submit_conf

    cfg = load_config()
    build = dag.get_task("build_samples")
    assert build.application == str(BUILD_JOB) and build.conf == spark_submit_conf(cfg)
    flag, day, *rest = build.application_args
    assert isinstance(day, XComArg) and day.operator.task_id == "resolve_day"
    assert [flag, "2026-11-02", *rest] == build_job_args(cfg, "2026-11-02")
    command = spark_submit_command(cfg, "2026-11-02")
    assert command[command.index(str(BUILD_JOB)) + 1:] == build_job_args(cfg, "2026-11-02")
    assert f"spark.sql.shuffle.partitions={cfg.spark.shuffle_partitions}" in command


def test_dag_and_run_day_follow_the_one_step_list(dag, monkeypatch):
    """The step order is written once (mmn.orchestration.STEPS): the DAG chains its tasks in
    it and run_day runs them in it."""
    import mmn.tasks as tasks
    from mmn.orchestration import STEPS

    assert {t.task_id for t in dag.tasks} == set(STEPS)
    for before, after in zip(STEPS, STEPS[1:], strict=False):
        assert after in dag.get_task(before).downstream_task_ids

    calls: list[str] = []

    def fake(name, result=None):
        return lambda *a, **k: calls.append(name) or result

    monkeypatch.setattr(tasks, "resolve_day", fake("resolve_day", "2026-11-10"))
    monkeypatch.setattr(tasks, "check_raw_logs", fake("check_raw_logs", 1))
    monkeypatch.setattr(tasks, "build_day", fake("build_samples"))
    monkeypatch.setattr(tasks, "validate_day", fake("validate"))
    monkeypatch.setattr(tasks, "train_day", fake("train", "run-1"))
    monkeypatch.setattr(tasks, "evaluate_day", fake("evaluate", {"e": 1}))
    monkeypatch.setattr(tasks, "gate_day", fake("gate_and_promote", {"decision": "dry_run"}))
    assert tasks.run_day(load_config(), "2026-11-10", dry_run=True) == {"decision": "dry_run"}
    assert calls == list(STEPS)


def test_the_dag_and_every_task_say_what_they_do(dag):
    """Issue 18 item 4: a DAG description, and a doc_md per task naming what it reads and writes."""
    assert dag.description and "champion" in dag.description
    for task in dag.tasks:
        assert task.doc_md and "**Reads**" in task.doc_md and "**Writes**" in task.doc_md, task.task_id
    assert "MLflow run" in dag.get_task("gate_and_promote").doc_md


def test_demo_console_sends_everything_but_its_lines_to_the_log_file(tmp_path, capfd):
    """Issue 18 item 3: inside capture(), this process's and its children's output land in
    the log file; say() still reaches the terminal; since() returns what a task wrote."""
    import subprocess
    import sys

    from mmn.demo import Console, demo_run_id

    console = Console(tmp_path / "logs" / "demo.log")
    with console.capture():
        console.say("  2026-11-01  train  success  1.0 s")
        offset = console.offset()
        print("chatter from this process")
        subprocess.run([sys.executable, "-c", "import sys; print('spark INFO line'); "
                        "print('warning', file=sys.stderr)"], check=True)
        captured = console.since(offset)
    terminal = capfd.readouterr().out
    assert "train  success" in terminal and "chatter" not in terminal and "spark INFO" not in terminal
    assert "chatter from this process" in captured and "spark INFO line" in captured
    assert "warning" in console.log_path.read_text()
    assert demo_run_id("2026-11-03").startswith("impression_day__2026-11-03__")
