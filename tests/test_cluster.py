"""The scale-out mode run for real: the compose file's services as native processes (mmn.cluster).

A Spark standalone master and worker, PostgreSQL (Airflow's metadata DB and MLflow's backend
store), an MLflow tracking server with basic auth and an artifact proxy, and Airflow with the
LocalExecutor on Postgres (scheduler, dag-processor, api-server), all on 127.0.0.1 in a temp
folder. Two small generated days are triggered through the api-server's REST API; the build
must run on the standalone master, runs and versions must land in the tracking server, the
second gate must compare against the first day's champion, a 2-process torchrun must log to
the server too, and every process must stop cleanly. `make cluster-test` runs this file;
`make test` runs it when the prerequisites are present (Java, PostgreSQL, psycopg2, ss) and
skips it with the reason otherwise (MMN_REQUIRE_CLUSTER=1, as .ci/run sets, fails instead).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from core.config import REPO_ROOT
from core.schedule import interval_start_for
from mmn.cluster import BUILD_APP_NAME, DAG_ID, NativeStack, missing_prerequisites
from mmn.cluster_services import http, listeners
from tests.test_ddp import HOLDOUT, N_SCENARIOS, N_TYPES, TRAIN_DAYS
from tests.test_ddp import _overrides as ddp_overrides

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]

DAYS = ["2026-11-01", "2026-11-02"]
RUN_TIMEOUT_S = 600
# Small days and a small model, as the unit tests' conftest sets them (the same keys, as
# MMN__ overrides on top of the compose file's): a run is about mechanics, not model quality.
SMALL = {
    "MMN__GENERATOR__IMPRESSIONS_PER_DAY": "4000",
    "MMN__MODEL__CTR_HIDDEN": "[32, 16]",
    "MMN__MODEL__CVR_HIDDEN": "[32, 16]",
    "MMN__TRAINING__EPOCHS": "1",
    "MMN__TRAINING__BATCH_SIZE": "256",
    "MMN__TRAINING__SHUFFLE_BUFFER": "4096",
    "MMN__TRAINING__EVAL_EVERY_STEPS": "20",
    "MMN__EVALUATION__BOOTSTRAP_SAMPLES": "20",
    "MMN__GATE__METRIC": "cvr_auc",
    "MMN__GATE__FLOOR": "0.0",
    "MMN__AIRFLOW__RETRIES": "0",
    "MMN__SPARK__SHUFFLE_PARTITIONS": "1",
    "MMN__SPARK__OUTPUT_FILES_PER_DAY": "1",
    "MMN__SPARK__DRIVER_MEMORY": "512m",
}
LOOPBACK_ADDRESSES = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def _require_prerequisites() -> None:
    missing = missing_prerequisites()
    if missing:
        message = "cluster test prerequisites missing: " + "; ".join(missing)
        if os.environ.get("MMN_REQUIRE_CLUSTER"):
            pytest.fail(message)
        pytest.skip(message)


def _pids_of(process_column: str) -> set[int]:
    return {int(p) for p in re.findall(r"pid=(\d+)", process_column)}


class Watch:
    """Samples the stack's listening sockets while the DAG runs (drivers and executors included)."""

    def __init__(self, stack: NativeStack) -> None:
        self.stack, self.seen, self._stop = stack, set(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(5):
            self.sample()

    def sample(self) -> None:
        pids = self.stack.pids()
        self.seen |= {(addr, port, col) for addr, port, col in listeners() if _pids_of(col) & pids}

    def __enter__(self) -> Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()
        self.sample()


class DDPJob:
    """tests/cluster_ddp.py under `torchrun --nproc_per_node=2` on synthetic days (test_ddp's),
    logging to a run of the stack's tracking server; started at once, waited for later."""

    def __init__(self, stack: NativeStack) -> None:
        from core.config import load_config
        from simulation.synthetic import write_days

        self.root = stack.root / "ddp"
        overrides = [*ddp_overrides(self.root), "training.epochs=1"]
        self.cfg = load_config(overrides=overrides, environ=stack.base_env())
        write_days(self.cfg, [*TRAIN_DAYS, HOLDOUT], 6000, N_TYPES, N_SCENARIOS)
        client = _client(stack, stack.secrets["MLFLOW_ADMIN_PASSWORD"])
        experiment = client.create_experiment("mmn_cluster_ddp")
        self.run_id = client.create_run(experiment, run_name="torchrun x2").info.run_id
        env = {**stack.base_env(), "MLFLOW_TRACKING_URI": stack.mlflow_url, "MLFLOW_TRACKING_USERNAME": "admin",
               "MLFLOW_TRACKING_PASSWORD": stack.secrets["MLFLOW_ADMIN_PASSWORD"], "OMP_WAIT_POLICY": "PASSIVE"}
        cmd = [str(Path(stack.python).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
               str(REPO_ROOT / "tests" / "cluster_ddp.py"), "--run-id", self.run_id, "--days", *TRAIN_DAYS]
        for item in overrides:
            cmd += ["--set", item]
        self.log = stack.logs / "torchrun.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.began, self.seconds = time.monotonic(), 0.0

    def wait(self, timeout_s: float = 600) -> None:
        try:
            self.proc.wait(timeout=timeout_s)
        finally:
            self.kill()
        self.seconds = time.monotonic() - self.began

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _task_logs(stack: NativeStack, run_id: str) -> str:
    logs = sorted((stack.airflow_home / "logs").rglob("*.log"))
    picked = [p for p in logs if run_id in str(p)]
    return "\n".join(f"--- {p}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:]) for p in picked)


def _run_day(stack: NativeStack, cfg, day: str) -> dict:
    api = stack.airflow_api()
    start = interval_start_for(cfg, day)
    run_id = f"cluster__{day}"
    api.trigger(DAG_ID, run_id, start, start + dt.timedelta(days=1))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        status, run = api.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")
        if status == 401:
            api.token()  # the JWT expired
            continue
        assert status == 200, run
        if run["state"] in ("success", "failed"):
            break
        dead = [s.name for s in stack.services if not s.running()]
        assert not dead, f"services died during {run_id}: {dead}"
        time.sleep(5)
    else:
        pytest.fail(f"{run_id} did not finish in {RUN_TIMEOUT_S} s\n{_task_logs(stack, run_id)}")
    _, tis = api.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
    run["tasks"] = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}
    if run["state"] != "success":
        pytest.fail(f"{run_id}: {run['state']} {run['tasks']}\n{_task_logs(stack, run_id)}")
    return run


@pytest.fixture(scope="module")
def cluster():
    _require_prerequisites()
    # Under the system temp folder, not pytest's (private to root): the Postgres user must reach it.
    root = Path(tempfile.mkdtemp(prefix="mmn-cluster-"))
    stack = NativeStack(root, overrides=dict(SMALL))
    timings: dict[str, float] = {}
    began = time.monotonic()
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    ddp = None
    try:
        with Watch(stack) as watch:
            stack.start()
            timings["start"] = time.monotonic() - began
            cfg = stack.config()
            from simulation.generate_logs import generate

            generate(cfg, DAYS[0], len(DAYS))
            # The distributed training job runs beside the DAG: a second client of the same server.
            ddp = DDPJob(stack)
            stack.wait_for_dag()
            api = stack.airflow_api()
            status, body = api.call("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
            assert status == 200, body
            runs = {}
            for day in DAYS:  # one after the other, as max_active_runs=1 and the gate need
                t0 = time.monotonic()
                runs[day] = _run_day(stack, cfg, day)
                timings[f"run {day}"] = time.monotonic() - t0
            ddp.wait()
            timings["torchrun (beside the runs)"] = ddp.seconds
        # The test's own MLflow client logs in like the Airflow tasks do.
        os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"
        os.environ["MLFLOW_TRACKING_PASSWORD"] = stack.secrets["MLFLOW_ADMIN_PASSWORD"]
        yield {"stack": stack, "cfg": cfg, "runs": runs, "listeners": watch.seen, "timings": timings,
               "began": began, "ddp": ddp}
    finally:
        if ddp is not None:
            ddp.kill()
        stack.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if not os.environ.get("MMN_KEEP_TEST_DATA"):
            shutil.rmtree(root, ignore_errors=True)


def _client(stack: NativeStack, password: str | None = None):
    """A client of the stack's server; logged in by the environment the fixture sets, or ``password``."""
    from mlflow import MlflowClient

    if password is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", password
    return MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)


def _gate(cfg, day: str) -> dict:
    return json.loads((cfg.paths.reports_root / "gate" / f"{day}.json").read_text())


def test_both_days_ran_under_the_scheduler_triggered_through_the_rest_api(cluster):
    stack, runs = cluster["stack"], cluster["runs"]
    for day, run in runs.items():
        assert run["state"] == "success" and run["run_type"] == "manual", run
        assert run["dag_run_id"] == f"cluster__{day}"
        assert set(run["tasks"].values()) == {"success"}, run["tasks"]
        assert "build_samples" in run["tasks"] and "gate_and_promote" in run["tasks"]
    # The REST API refuses a caller without a token.
    status, _ = http("GET", f"{stack.airflow_url}/api/v2/dags/{DAG_ID}/dagRuns")
    assert status == 401


def test_the_build_ran_on_the_standalone_master(cluster):
    stack, cfg = cluster["stack"], cluster["cfg"]
    status = stack.spark_status()
    assert status["url"] == stack.spark_master_url
    assert [w["cores"] for w in status["workers"] if w["state"] == "ALIVE"] == [1]
    builds = [app for app in status["completedapps"] if app["name"] == BUILD_APP_NAME]
    assert len(builds) == len(DAYS), status["completedapps"]
    assert all(app["state"] == "FINISHED" and app["cores"] <= 1 for app in builds), builds
    for day in DAYS:  # the executors wrote the day's partition where every service reads it
        manifest = json.loads(cfg.paths.manifest_path(day).read_text())
        assert manifest["outputs"]["samples"] > 0
        assert any(cfg.paths.samples_dir(day).glob("*.parquet"))
    # The task ran spark-submit against spark://, not local[*].
    build_logs = [p for p in (stack.airflow_home / "logs").rglob("*.log") if "build_samples" in str(p)]
    assert build_logs and all(stack.spark_master_url in p.read_text(errors="replace") for p in build_logs)


def test_runs_and_registered_versions_are_in_the_tracking_server(cluster):
    stack, cfg = cluster["stack"], cluster["cfg"]
    client = _client(stack)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    # The server chose the artifact location: its proxy, reachable from every worker.
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    runs = client.search_runs([experiment.experiment_id])
    days = {r.data.tags.get("data_date") for r in runs}
    assert set(DAYS) <= days
    versions = client.search_model_versions(f"name='{cfg.mlflow.registered_model}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    for version in versions:  # the model files sit in the server's artifact store
        model = client.get_model_version_download_uri(version.name, version.version)
        assert model.startswith("mlflow-artifacts:"), model
    assert any(p.name == "MLmodel" for p in stack.artifacts.rglob("MLmodel"))
    # Basic auth: no credentials, no access.
    status, _ = http("GET", f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1")
    assert status == 401


def test_the_second_gate_compared_against_the_first_days_champion(cluster):
    stack, cfg = cluster["stack"], cluster["cfg"]
    from serving.registry import CHAMPION, PREVIOUS, alias_version

    first, second = (_gate(cfg, d) for d in DAYS)
    assert first["decision"] == "promoted" and first["version"] == "1" and first["champion_version"] is None
    assert second["champion_version"] == "1" and second["champion"] is not None, second
    client = _client(stack)
    name = cfg.mlflow.registered_model
    if second["decision"] == "promoted":
        assert alias_version(client, name, CHAMPION) == "2"
        assert alias_version(client, name, PREVIOUS) == "1"
    else:
        assert alias_version(client, name, CHAMPION) == "1"
        assert client.get_model_version(name, "2").tags["status"] == "rejected"
    assert client.get_model_version(name, "2").tags["gate.decision"] == second["decision"]


def test_the_gate_lock_on_postgres_excludes_a_second_holder(cluster):
    """The registry lock's Postgres flavour (pg_advisory_lock) on the real server."""
    stack = cluster["stack"]
    from serving.registry import plan_registry_lock, registry_lock

    plan = plan_registry_lock(cluster["cfg"].mlflow.tracking_uri, "mmn_cvr", lock_target=stack.db_uri("mlflow"))
    assert plan.kind == "postgres"
    with registry_lock(plan, timeout_s=5):
        with pytest.raises(TimeoutError):
            with registry_lock(plan, timeout_s=1.5):
                pass
    with registry_lock(plan, timeout_s=5):  # released: the next holder gets it at once
        pass


def test_torchrun_ddp_logs_to_the_tracking_server(cluster):
    """2-process DDP (torchrun, gloo) against the cluster's tracking server: both ranks log to
    one run over HTTP, rank 0's weights go up through the artifact proxy and come back."""
    import torch

    from simulation.synthetic import scenario_names, type_names
    from training.metrics import evaluate
    from training.models import build_model

    ddp, client = cluster["ddp"], _client(cluster["stack"])
    assert ddp.proc.returncode == 0, ddp.output()
    run = client.get_run(ddp.run_id)
    assert run.data.params["world_size"] == "2"
    assert {"rank0_steps", "rank1_steps"} <= set(run.data.metrics), run.data.metrics
    assert run.data.metrics["rank0_steps"] == run.data.metrics["rank1_steps"] > 0
    local = client.download_artifacts(ddp.run_id, "ddp/model.pt", str(ddp.root))
    model = build_model(ddp.cfg, N_TYPES, N_SCENARIOS, "mmn")
    model.load_state_dict(torch.load(local, weights_only=True))
    metrics = evaluate(model, ddp.cfg, [HOLDOUT], vocab_types=type_names(N_TYPES),
                       vocab_scenarios=scenario_names(N_SCENARIOS))
    assert metrics["cvr_auc"] > 0.6, metrics["cvr_auc"]


def test_every_listener_of_the_stack_is_on_loopback(cluster):
    seen = cluster["listeners"]
    stack = cluster["stack"]
    ports = {port for _, port, _ in seen}
    assert {stack.ports[name] for name in ("postgres", "spark_master", "spark_master_ui", "mlflow", "airflow")} <= ports
    exposed = sorted((addr, port, col) for addr, port, col in seen if addr not in LOOPBACK_ADDRESSES)
    assert not exposed, exposed


def test_zz_every_process_stops_cleanly(cluster):
    """Runs last (file order): stop the stack, then nothing of it may be left."""
    import psutil

    stack = cluster["stack"]
    pids = stack.pids()
    t0 = time.monotonic()
    report = stack.stop()
    cluster["timings"]["stop"] = time.monotonic() - t0
    print(f"\ncluster test timings (s): {json.dumps({k: round(v) for k, v in cluster['timings'].items()})}, "
          f"total so far {time.monotonic() - cluster['began']:.0f}")
    assert set(report) == {s.name for s in stack.services} | {"postgres"}
    assert all(how == "clean" for how in report.values()), json.dumps(report)
    left = [(a, p, c) for a, p, c in listeners() if p in stack.ports.values() or _pids_of(c) & pids]
    assert not left, left
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
    mine = [p.info for p in psutil.process_iter(["pid", "cmdline"])
            if str(stack.root) in " ".join(p.info["cmdline"] or [])]
    assert not mine, mine
