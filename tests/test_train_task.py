"""The train task's housekeeping (issue 17 item 11): runs killed without closing are marked
FAILED by the next attempt of the same day and kind; finished checkpoints are pruned."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import mlflow
import pytest
from mlflow import MlflowClient

from core.config import ConfigError, load_config
from mmn.train import (
    FINISHED_MARKER,
    OWNER_HOST,
    OWNER_PID,
    checkpoint_dir,
    fail_stale_runs,
    mark_finished,
    prune_checkpoints,
)


@pytest.fixture()
def experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return mlflow.create_experiment("train-task", artifact_location=(tmp_path / "art").as_uri())


TIMEOUT_MINUTES = 60.0


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _running(experiment: str, day: str, kind: str, pid: int | None = None) -> str:
    """A run left RUNNING, as a SIGKILLed training leaves it (owner: this host, ``pid``)."""
    tags = {"data_date": day, "model_kind": kind}
    if pid is not None:
        tags |= {OWNER_HOST: socket.gethostname(), OWNER_PID: str(pid)}
    return MlflowClient().create_run(experiment, tags=tags).info.run_id


def test_stale_running_runs_of_the_same_day_and_kind_are_marked_failed(experiment, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    killed = _running(experiment, "2026-11-10", "mmn", pid=_dead_pid())
    other_kind = _running(experiment, "2026-11-10", "dnn", pid=_dead_pid())
    other_day = _running(experiment, "2026-11-09", "mmn", pid=_dead_pid())
    with mlflow.start_run(experiment_id=experiment, tags={"data_date": "2026-11-10", "model_kind": "mmn"}):
        pass  # a finished run stays FINISHED
    assert fail_stale_runs(experiment, "2026-11-10", "mmn", TIMEOUT_MINUTES) == [killed]
    client = MlflowClient()
    stale = client.get_run(killed)
    assert stale.info.status == "FAILED" and "stale" in stale.data.tags["mmn.failed_reason"]
    assert client.get_run(other_kind).info.status == client.get_run(other_day).info.status == "RUNNING"
    assert fail_stale_runs(experiment, "2026-11-10", "mmn", TIMEOUT_MINUTES) == []


def test_a_live_concurrent_run_of_the_same_day_and_kind_is_left_alone(experiment, monkeypatch):
    """A comparison or a search training the same day and kind beside the daily run."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    live = _running(experiment, "2026-11-10", "mmn", pid=os.getpid())
    untagged_recent = _running(experiment, "2026-11-10", "mmn")  # owner unknown, young
    assert fail_stale_runs(experiment, "2026-11-10", "mmn", TIMEOUT_MINUTES) == []
    assert fail_stale_runs(experiment, "2026-11-10", "mmn", 0.0) == [untagged_recent]  # past the timeout
    assert MlflowClient().get_run(live).info.status == "RUNNING"


def test_the_current_mlflow_project_run_is_not_stale(experiment, monkeypatch):
    own = _running(experiment, "2026-11-10", "mmn", pid=_dead_pid())
    monkeypatch.setenv("MLFLOW_RUN_ID", own)
    assert fail_stale_runs(experiment, "2026-11-10", "mmn", TIMEOUT_MINUTES) == []


def test_finished_checkpoints_are_pruned_to_the_retention_per_kind(tmp_path):
    cfg = load_config(overrides={"paths.reports_root": str(tmp_path / "reports")})
    days = ["2026-11-07", "2026-11-08", "2026-11-09", "2026-11-10"]
    for kind in ("mmn", "dnn"):
        for day in days:
            folder = checkpoint_dir(cfg, kind, day)
            folder.mkdir(parents=True)
            (folder / "latest.pt").write_bytes(b"weights")
            if day != days[0]:
                mark_finished(cfg, kind, day, f"run-{kind}-{day}")
    removed = prune_checkpoints(cfg, keep=2)
    assert sorted(p.name for p in removed) == ["dnn-2026-11-08", "mmn-2026-11-08"]
    for kind in ("mmn", "dnn"):
        assert (checkpoint_dir(cfg, kind, days[0]) / "latest.pt").exists()  # unfinished: kept
        assert all((checkpoint_dir(cfg, kind, d) / FINISHED_MARKER).exists() for d in days[2:])
    assert prune_checkpoints(cfg, keep=None) == []
    assert len(prune_checkpoints(cfg, keep=0)) == 4


def test_checkpoint_retention_is_checked_at_load():
    assert load_config().training.checkpoint_retention >= 0
    for bad in (-1, "abc", 1.5):
        with pytest.raises(ConfigError, match="checkpoint_retention"):
            load_config(overrides={"training.checkpoint_retention": bad})
