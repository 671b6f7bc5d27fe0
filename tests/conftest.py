"""Test session setup: every path, store and AIRFLOW_HOME under one temp folder.

Airflow reads its settings when first imported, so the environment is set in
pytest_configure, before any test module imports airflow. The pipeline config is the
real conf/pipeline.yaml with MMN__ overrides: smaller towers and days so CPU tests are quick.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

SESSION_ROOT = Path(tempfile.mkdtemp(prefix="mmn-tests-"))

TEST_OVERRIDES = {
    "MMN__PATHS__RAW_ROOT": str(SESSION_ROOT / "raw"),
    "MMN__PATHS__LAKE_ROOT": str(SESSION_ROOT / "lake"),
    "MMN__PATHS__TRUTH_ROOT": str(SESSION_ROOT / "truth"),
    "MMN__PATHS__REPORTS_ROOT": str(SESSION_ROOT / "reports"),
    "MMN__MLFLOW__TRACKING_URI": f"sqlite:///{SESSION_ROOT / 'mlflow' / 'mlflow.db'}",
    "MMN__MLFLOW__ARTIFACT_ROOT": str(SESSION_ROOT / "mlflow" / "artifacts"),
    "MMN__GENERATOR__IMPRESSIONS_PER_DAY": "8000",
    "MMN__MODEL__CTR_HIDDEN": "[64, 32]",
    "MMN__MODEL__CVR_HIDDEN": "[64, 32]",
    "MMN__TRAINING__BATCH_SIZE": "256",
    "MMN__TRAINING__SHUFFLE_BUFFER": "4096",
    "MMN__TRAINING__CHECKPOINT_EVERY_STEPS": "50",
    "MMN__TRAINING__EVAL_EVERY_STEPS": "20",
    # Tiny days: gate on overall CVR AUC (defined on a few hundred clicks), floor 0, so the
    # e2e tests exercise the promotion mechanics; the gate's rules have their own tests.
    "MMN__GATE__METRIC": "cvr_auc",
    "MMN__GATE__FLOOR": "0.0",
    "MMN__SPARK__MASTER": "local[2]",
    "MMN__AIRFLOW__RETRIES": "0",  # a failing task fails the test at once, no backoff waits
    "MMN__SPARK__SHUFFLE_PARTITIONS": "2",
}


def pytest_configure(config: pytest.Config) -> None:
    (SESSION_ROOT / "mlflow").mkdir(parents=True, exist_ok=True)
    os.environ.update(TEST_OVERRIDES)
    os.environ["AIRFLOW_HOME"] = str(SESSION_ROOT / "airflow")
    os.environ.setdefault("MPLBACKEND", "Agg")
    from core.config import load_config
    from mmn.airflow_env import apply

    apply(load_config())


def pytest_unconfigure(config: pytest.Config) -> None:
    if not os.environ.get("MMN_KEEP_TEST_DATA"):
        shutil.rmtree(SESSION_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def session_root() -> Path:
    return SESSION_ROOT


@pytest.fixture()
def one_torch_thread():
    """One intra-op thread for tests of tiny tensors: on a shared 2-core box, OpenMP
    spin-waits under contention make multi-threaded tiny ops ~10x slower; results match up
    to float rounding. Modules opt in with ``pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
