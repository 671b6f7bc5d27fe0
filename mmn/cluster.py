"""The scale-out deployment (docker-compose.yml) as native processes on one machine.

The same services as the compose file, bound to 127.0.0.1 on free ports, everything under
one folder: PostgreSQL (a throwaway cluster by ``initdb`` / ``pg_ctl``, run as an unprivileged
user; it holds Airflow's metadata DB and MLflow's backend store, created by the compose
file's own ``docker/postgres-init.sh``), a Spark standalone master and one worker
(``spark-class`` of the pinned pyspark), an MLflow tracking server with its basic-auth app
and an artifact proxy, and Airflow with the LocalExecutor on Postgres (scheduler,
dag-processor, api-server). ``make cluster-test`` (tests/test_cluster.py) runs the daily DAG
on it; ``python -m mmn.cluster up`` starts it for a person (docs/deployment.md).

The environment is the compose file's: every ``MMN__*`` / ``AIRFLOW__*`` / ``MLFLOW_*``
variable it sets is set here too, with a container address (``http://mlflow:5000``, a
``/data`` volume, a ``${SECRET}`` from .env) replaced by its native counterpart
(:data:`COMPOSE_ADDRESSES`); the few deliberate differences are listed with their reason in
:data:`DIFFERENCES`. tests/test_cluster_parity.py holds the two in step.

Every service runs in its own process group and is stopped by SIGTERM to the group (then
SIGKILL after a grace period), in reverse start order, also when a start fails.
"""

from __future__ import annotations

import argparse
import configparser
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import REPO_ROOT, load_config
from core.threads import policy_for, process_env
from mmn.cluster_services import (
    LOOPBACK,
    AirflowAPI,
    Service,
    as_user,
    free_port,
    http,
    http_ok,
    run_logged,
    wait_until,
)

DAG_ID = "mmn_daily_retrain"
BUILD_APP_NAME = "mmn-build-samples"  # the SparkSubmitOperator's application name
ADMIN = "admin"
# The user the throwaway Postgres runs as when this runs as root (initdb refuses root).
PG_USER_ENV = "MMN_CLUSTER_PG_USER"
PG_USERS = ("mmn-pg", "nobody")
# The .env secrets of the compose file, generated per stack.
SECRET_NAMES = ("POSTGRES_PASSWORD", "AIRFLOW_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "AIRFLOW_ADMIN_PASSWORD",
                "MLFLOW_ADMIN_PASSWORD", "AIRFLOW_JWT_SECRET", "AIRFLOW_SECRET_KEY", "MLFLOW_SECRET_KEY")
# Container addresses of the compose file and what stands for them here (attribute names of
# NativeStack): service host:port pairs, volume mounts and the image's paths.
COMPOSE_ADDRESSES = {
    "http://mlflow:5000": "mlflow_url",
    "spark://spark-master:7077": "spark_master_url",
    "spark://spark-master": "spark_master_host",
    "@postgres:5432/": "postgres_at",
    "http://airflow-apiserver:8080": "airflow_url",
    "/data/": "data_prefix",
    "/opt/airflow": "airflow_home_str",
    "/opt/mmn": "repo_root_str",
    "/mlflow-artifacts": "artifacts_str",
    "/usr/local/bin/python": "python",
}
# Compose's ports inside the network and the stack's services that stand for them.
COMPOSE_PORTS = {5432: "postgres", 7077: "spark_master", 8081: "spark_master_ui", 8082: "spark_worker_ui",
                 5000: "mlflow", 8080: "airflow"}
# Where the native stack differs from the compose file on purpose.
DIFFERENCES = {
    "--host": "compose binds the container's interfaces (published on 127.0.0.1 only); natively 127.0.0.1",
    "--workers": "one MLflow server worker on a 2-core machine; compose runs 2",
    "--allowed-hosts": "the Host headers of the clients: container names there, loopback here",
    "MLFLOW_AUTH_CONFIG_PATH": "the compose file's docker/mlflow-basic-auth.ini, copied with its database_uri "
                               "moved from the mlflow-auth volume into the stack's folder",
    "airflow-triggerer": "no task of the DAGs defers, so the native stack starts no triggerer",
    "AIRFLOW__CORE__PARALLELISM": "airflow.parallelism of the config (2): a 2-core machine runs two tasks "
                                  "at once; the compose file sizes for a bigger host (4)",
    "SPARK_WORKER_CORES": "one core (the issue's bounded worker); compose defaults to 2",
    "SPARK_WORKER_MEMORY": "1g; compose defaults to 4g",
}
SPARK_WORKER_CORES = "1"
SPARK_WORKER_MEMORY = "1g"


def venv_bin() -> Path:
    return Path(sys.executable).parent


def postgres_bindir() -> Path | None:
    """Debian's PostgreSQL binaries: ``initdb`` on PATH (resolved), else /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(dirs[-1]).parent if dirs else None


def pg_user() -> tuple[int, int] | None:
    """(uid, gid) Postgres runs as: none when not root; as root $MMN_CLUSTER_PG_USER, else mmn-pg, else nobody."""
    if os.geteuid() != 0:
        return None
    names = [os.environ[PG_USER_ENV]] if os.environ.get(PG_USER_ENV) else list(PG_USERS)
    for name in names:
        try:
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            continue
    raise RuntimeError(f"running as root and none of the users {names} exists to run Postgres: "
                       "useradd --system mmn-pg")


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run the stack (empty: it can)."""
    missing = []
    if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
        missing.append("Java 17+ (apt-get install openjdk-17-jre-headless)")
    if postgres_bindir() is None:
        missing.append("PostgreSQL's initdb/pg_ctl (apt-get install postgresql)")
    for module, package in (("psycopg2", "psycopg2-binary"), ("asyncpg", "asyncpg"), ("flask_wtf", "Flask-WTF")):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{package} in the venv (make venv)")
    if not shutil.which("ss"):
        missing.append("ss (apt-get install iproute2)")
    try:
        pg_user()
    except RuntimeError as exc:
        missing.append(str(exc))
    return missing


# ---------------------------------------------------------------- the stack


@dataclass
class NativeStack:
    """The compose deployment's services as native processes under ``root`` (see the module doc).

    ``overrides``: extra ``MMN__*`` settings for every pipeline process (e.g. small days)."""

    root: Path
    overrides: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)
    stop_report: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        for name in ("postgres", "spark_master", "spark_master_ui", "spark_worker", "spark_worker_ui",
                     "mlflow", "airflow"):
            self.ports.setdefault(name, free_port())
        for name in SECRET_NAMES:  # hex: safe inside connection URLs
            self.secrets.setdefault(name, secrets.token_hex(16))
        self.pg_user: tuple[int, int] | None = None  # set when Postgres starts
        self.pg_dir = self.root / "postgres"
        self.logs = self.root / "logs"
        self.airflow_home = self.root / "airflow"
        self.artifacts = self.root / "mlflow-artifacts"
        self.auth_dir = self.root / "mlflow-auth"

    # ------------------------------------------------ addresses (the compose names' stand-ins)
    @property
    def mlflow_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['mlflow']}"

    @property
    def spark_master_url(self) -> str:
        return f"spark://{LOOPBACK}:{self.ports['spark_master']}"

    @property
    def spark_master_host(self) -> str:
        return f"spark://{LOOPBACK}"

    @property
    def spark_master_ui(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['spark_master_ui']}"

    @property
    def postgres_at(self) -> str:
        return f"@{LOOPBACK}:{self.ports['postgres']}/"

    @property
    def airflow_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['airflow']}"

    @property
    def data_prefix(self) -> str:
        return f"{self.root / 'data'}/"

    @property
    def airflow_home_str(self) -> str:
        return str(self.airflow_home)

    @property
    def repo_root_str(self) -> str:
        return str(REPO_ROOT)

    @property
    def artifacts_str(self) -> str:
        return str(self.artifacts)

    @property
    def python(self) -> str:
        return sys.executable

    def db_uri(self, db: str) -> str:
        """SQLAlchemy URI of the ``airflow`` or ``mlflow`` database (user = database, as in docker/postgres-init.sh)."""
        return f"postgresql+psycopg2://{db}:{self.secrets[db.upper() + '_DB_PASSWORD']}{self.postgres_at}{db}"

    # ------------------------------------------------ environments (the compose file's anchors)
    def base_env(self) -> dict[str, str]:
        """The caller's environment without any pipeline, Airflow, MLflow or Spark setting."""
        drop = ("MMN_", "AIRFLOW", "MLFLOW_", "SPARK_", "PYSPARK_", "PG", "OMP_", "MKL_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
        env["NO_PROXY"] = env["no_proxy"] = f"{LOOPBACK},localhost"
        return env

    def pipeline_env(self) -> dict[str, str]:
        """x-pipeline-env: every pipeline process (Spark services, Airflow tasks)."""
        data = self.root / "data"
        return {
            "MMN__PATHS__RAW_ROOT": str(data / "raw"),
            "MMN__PATHS__LAKE_ROOT": str(data / "lake"),
            "MMN__PATHS__TRUTH_ROOT": str(data / "truth"),
            "MMN__PATHS__REPORTS_ROOT": str(data / "reports"),
            "MMN__MLFLOW__TRACKING_URI": self.mlflow_url,
            "MMN__SPARK__MASTER": self.spark_master_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "PYSPARK_PYTHON": sys.executable,
            # Native only: one host, so every JVM and the driver bind loopback.
            "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": LOOPBACK,
            **self.overrides,
        }

    def config(self) -> Any:
        """The pipeline config every process of the stack loads (conf/pipeline.yaml + the overrides)."""
        return load_config(environ={**self.base_env(), **self.pipeline_env()})

    def airflow_env(self) -> dict[str, str]:
        """x-airflow-env: Airflow's components and their task processes."""
        cfg = self.config()
        return {
            **self.base_env(),
            **self.pipeline_env(),
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": str(cfg.airflow.parallelism),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_uri("airflow"),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.airflow_url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": self.secrets["AIRFLOW_JWT_SECRET"],
            "AIRFLOW__API__SECRET_KEY": self.secrets["AIRFLOW_SECRET_KEY"],
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.airflow_home / "simple_auth_manager_passwords.json"),
            "MLFLOW_TRACKING_USERNAME": ADMIN,
            "MLFLOW_TRACKING_PASSWORD": self.secrets["MLFLOW_ADMIN_PASSWORD"],
            "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": self.spark_master_host,
                                                      "port": self.ports["spark_master"]}),
            # The thread policy's OMP_WAIT_POLICY (runtime.omp_wait_policy) before a task imports torch.
            **process_env(policy_for(cfg)),
            # Native only: the api-server on loopback with one worker.
            "AIRFLOW__API__HOST": LOOPBACK,
            "AIRFLOW__API__PORT": str(self.ports["airflow"]),
            "AIRFLOW__API__WORKERS": "1",
        }

    def mlflow_env(self) -> dict[str, str]:
        """The mlflow service's environment: basic auth, its admin, no job consumers."""
        return {
            **self.base_env(),
            "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_dir / "mlflow-basic-auth.ini"),
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets["MLFLOW_ADMIN_PASSWORD"],
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets["MLFLOW_SECRET_KEY"],
        }

    def spark_env(self, worker: bool = False) -> dict[str, str]:
        env = {**self.base_env(), **self.pipeline_env(),
               "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false"}
        if worker:
            env.update(SPARK_WORKER_CORES=SPARK_WORKER_CORES, SPARK_WORKER_MEMORY=SPARK_WORKER_MEMORY,
                       SPARK_WORKER_DIR=str(self.root / "spark-work"))
        return env

    def mlflow_argv(self) -> list[str]:
        return [str(venv_bin() / "mlflow"), "server", "--app-name", "basic-auth",
                "--backend-store-uri", self.db_uri("mlflow"),
                "--artifacts-destination", str(self.artifacts),
                "--host", LOOPBACK, "--port", str(self.ports["mlflow"]), "--workers", "1",
                "--allowed-hosts", f"{LOOPBACK},{LOOPBACK}:*,localhost,localhost:*"]

    # ------------------------------------------------ start / stop
    def __enter__(self) -> NativeStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)  # the Postgres user must reach its folder inside
        for sub in ("data/raw", "data/lake", "data/truth", "data/reports", "mlflow-artifacts", "spark-work"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.start_postgres()
        spark = self.start_spark()
        mlflow = self.start_mlflow()
        self.airflow_migrate()  # the slowest step; Spark and MLflow come up meanwhile
        wait_until("a Spark worker registered with the master", self.spark_worker_alive, 180, spark)
        wait_until("the MLflow server's /health", lambda: http_ok(f"{self.mlflow_url}/health"), 300, [mlflow])
        self.start_airflow()

    def _add(self, svc: Service) -> Service:
        self.services.append(svc.start())
        return svc

    def start_postgres(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL's initdb was not found (apt-get install postgresql)")
        self.pg_user = pg_user()
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        if self.pg_user:
            os.chown(self.pg_dir, *self.pg_user)
        self.pg_dir.chmod(0o700)
        pwfile = self.pg_dir / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, self.secrets["POSTGRES_PASSWORD"].encode())
        os.close(fd)
        if self.pg_user:
            os.chown(pwfile, *self.pg_user)
        env = {**self.base_env(), "PATH": f"{bindir}{os.pathsep}{self.base_env()['PATH']}"}
        log = self.logs / "postgres-init.log"
        self._pg_bindir = bindir
        run_logged([str(bindir / "initdb"), "-D", str(self.pg_dir / "data"), "-U", "postgres", "-E", "UTF8",
                    "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"],
                   env, log, 180, self.pg_user, self.pg_dir)
        pwfile.unlink()
        options = (f"-h {LOOPBACK} -p {self.ports['postgres']} -k {self.pg_dir} "
                   "-c shared_buffers=32MB -c max_connections=60")
        run_logged([str(bindir / "pg_ctl"), "-D", str(self.pg_dir / "data"), "-l", str(self.pg_dir / "postgres.log"),
                    "-w", "-t", "120", "-o", options, "start"], env, log, 180, self.pg_user, self.pg_dir)
        # The compose file's own init script: the airflow and mlflow users and databases.
        run_logged(["bash", str(REPO_ROOT / "docker" / "postgres-init.sh")], {
            **env, "PGHOST": LOOPBACK, "PGPORT": str(self.ports["postgres"]), "POSTGRES_USER": "postgres",
            "POSTGRES_DB": "postgres", "PGPASSWORD": self.secrets["POSTGRES_PASSWORD"],
            "AIRFLOW_DB_PASSWORD": self.secrets["AIRFLOW_DB_PASSWORD"],
            "MLFLOW_DB_PASSWORD": self.secrets["MLFLOW_DB_PASSWORD"]}, log, 120)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.pg_dir / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop_postgres(self) -> str:
        pid = self.postmaster_pid()
        if pid is None:
            return "not running"
        env = self.base_env()
        try:
            subprocess.run([str(self._pg_bindir / "pg_ctl"), "-D", str(self.pg_dir / "data"), "-m", "fast",
                            "-w", "-t", "60", "stop"], env=env, cwd=self.pg_dir, capture_output=True,
                           timeout=90, **as_user(self.pg_user))
        except (subprocess.TimeoutExpired, AttributeError):
            pass
        import psutil

        # pg_ctl returns once the pid file is gone, a moment before the postmaster has exited;
        # a zombie has exited too (its parent, init since pg_ctl left, reaps it later).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return "clean"
            except psutil.NoSuchProcess:
                return "clean"
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        return "killed"

    def start_spark(self) -> list[Service]:
        spark_class = str(venv_bin() / "spark-class")
        master = self._add(Service("spark-master", [
            spark_class, "org.apache.spark.deploy.master.Master", "--host", LOOPBACK,
            "--port", str(self.ports["spark_master"]), "--webui-port", str(self.ports["spark_master_ui"])],
            self.spark_env(), self.logs / "spark-master.log", cwd=self.root))
        worker = self._add(Service("spark-worker", [
            spark_class, "org.apache.spark.deploy.worker.Worker", self.spark_master_url, "--host", LOOPBACK,
            "--port", str(self.ports["spark_worker"]), "--webui-port", str(self.ports["spark_worker_ui"])],
            self.spark_env(worker=True), self.logs / "spark-worker.log", cwd=self.root))
        return [master, worker]

    def spark_status(self) -> dict[str, Any]:
        """The master's JSON status (workers, active and completed applications)."""
        status, body = http("GET", f"{self.spark_master_ui}/json/")
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"Spark master status: HTTP {status}")
        return body

    def spark_worker_alive(self) -> bool:
        try:
            return any(w.get("state") == "ALIVE" for w in self.spark_status().get("workers", []))
        except (OSError, RuntimeError):
            return False

    def write_auth_config(self) -> Path:
        """The compose file's docker/mlflow-basic-auth.ini with the users' DB in the stack's folder."""
        self.auth_dir.mkdir(parents=True, exist_ok=True)
        ini = configparser.ConfigParser()
        ini.read(REPO_ROOT / "docker" / "mlflow-basic-auth.ini")
        ini["mlflow"]["database_uri"] = f"sqlite:///{self.auth_dir / 'basic_auth.db'}"
        path = Path(self.mlflow_env()["MLFLOW_AUTH_CONFIG_PATH"])
        with open(path, "w") as fh:
            ini.write(fh)
        return path

    def start_mlflow(self) -> Service:
        self.write_auth_config()
        return self._add(Service("mlflow", self.mlflow_argv(), self.mlflow_env(), self.logs / "mlflow.log",
                                 cwd=self.root))

    def airflow_migrate(self) -> None:
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        self.airflow_home.chmod(0o700)
        env = self.airflow_env()
        # What the compose api-server writes before it starts: the admin's password, mode 600.
        path = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, json.dumps({ADMIN: self.secrets["AIRFLOW_ADMIN_PASSWORD"]}).encode())
        os.close(fd)
        run_logged([str(venv_bin() / "airflow"), "db", "migrate"], env, self.logs / "airflow-db-migrate.log", 900,
                   cwd=self.root)

    def start_airflow(self) -> None:
        airflow, env = str(venv_bin() / "airflow"), self.airflow_env()
        api = self._add(Service("airflow-api-server", [airflow, "api-server", "--host", LOOPBACK, "--port",
                                                        str(self.ports["airflow"])], env,
                                self.logs / "airflow-api-server.log", cwd=self.root))
        # No log server: on one host the api-server reads task logs from the files.
        self._add(Service("airflow-scheduler", [airflow, "scheduler", "--skip-serve-logs"], env,
                          self.logs / "airflow-scheduler.log", cwd=self.root))
        self._add(Service("airflow-dag-processor", [airflow, "dag-processor"], env,
                          self.logs / "airflow-dag-processor.log", cwd=self.root))
        wait_until("the Airflow api-server's health", lambda: http_ok(
            f"{self.airflow_url}/api/v2/monitor/health"), 300, [api])

    def airflow_api(self) -> AirflowAPI:
        return AirflowAPI(self.airflow_url, ADMIN, self.secrets["AIRFLOW_ADMIN_PASSWORD"])

    def wait_for_dag(self, dag_id: str = DAG_ID, timeout_s: float = 300) -> None:
        api = self.airflow_api()
        wait_until(f"the dag-processor to parse {dag_id}", lambda: api.call("GET", f"/dags/{dag_id}")[0] == 200,
                   timeout_s, self.services, every_s=3)

    def pids(self) -> set[int]:
        """Every live process of the stack (services, their descendants, the postmaster's tree)."""
        import psutil

        roots = [s.proc.pid for s in self.services if s.running()] + [p for p in [self.postmaster_pid()] if p]
        found: set[int] = set()
        for pid in roots:
            try:
                proc = psutil.Process(pid)
                found |= {proc.pid, *(c.pid for c in proc.children(recursive=True))}
            except psutil.NoSuchProcess:
                continue
        return found

    def stop(self) -> dict[str, str]:
        """Stop every service, last started first, and Postgres; returns how each one stopped."""
        for svc in reversed(self.services):
            self.stop_report[svc.name] = svc.stop()
        if hasattr(self, "_pg_bindir"):
            self.stop_report["postgres"] = self.stop_postgres()
        return self.stop_report


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmn.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "check"], help="up: start the stack until Ctrl-C; "
                        "check: list missing prerequisites")
    parser.add_argument("--root", type=Path, help="folder for data, stores and logs (default: a new temp folder)")
    args = parser.parse_args(argv)
    missing = missing_prerequisites()
    if args.command == "check" or missing:
        print("\n".join(f"missing: {m}" for m in missing) or "all prerequisites present")
        return 1 if missing else 0
    root = args.root or Path(tempfile.mkdtemp(prefix="mmn-cluster-"))
    stack = NativeStack(root)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    with stack:
        stack.wait_for_dag()
        print(f"stack up under {root} (logs: {stack.logs})\n"
              f"  Airflow  {stack.airflow_url}  user {ADMIN}, password {stack.secrets['AIRFLOW_ADMIN_PASSWORD']}\n"
              f"  MLflow   {stack.mlflow_url}  user {ADMIN}, password {stack.secrets['MLFLOW_ADMIN_PASSWORD']}\n"
              f"  Spark    {stack.spark_master_url} (UI {stack.spark_master_ui})\n"
              "  the pipeline's environment:\n"
              + "".join(f"    {k}={v}\n" for k, v in stack.pipeline_env().items())
              + "Ctrl-C stops every service", flush=True)
        try:
            while not stopping and all(s.running() for s in stack.services):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    print("stopped: " + ", ".join(f"{k} {v}" for k, v in stack.stop_report.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
