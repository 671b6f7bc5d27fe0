"""The embedded Airflow setup derived from the pipeline config, in one place.

Airflow reads its settings from the environment when it is first imported, so every
entry point (the `mmn airflow` wrapper, the demo, the tests) calls :func:`apply` first.

Security defaults of the embedded mode: the api-server listens on 127.0.0.1 unless
$AIRFLOW__API__HOST says otherwise; the scheduler and triggerer run without their log
servers (Airflow binds those to every interface, ports 8793/8794, with no setting to change
it; every component here shares one machine, so the UI reads task logs from the files);
AIRFLOW_HOME (airflow.cfg holds generated secrets) is private to its owner and the
generated admin password file is mode 600.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from core.config import REPO_ROOT, PipelineConfig
from core.threads import policy_for, process_env, spark_master

AIRFLOW_HOME = REPO_ROOT / ".airflow"
LOOPBACK = "127.0.0.1"
DEFAULT_API_PORT = 8080
PASSWORD_FILE_NAME = "simple_auth_manager_passwords.json.generated"
# `airflow standalone`'s components, each with the flags the embedded mode needs.
STANDALONE_COMPONENTS: dict[str, list[str]] = {
    "api-server": [],
    "scheduler": ["--skip-serve-logs"],
    "dag-processor": [],
    "triggerer": ["--skip-serve-logs"],
}
# Airflow commands that start a log server on 0.0.0.0 unless told to skip it.
SERVES_LOGS = {name for name, flags in STANDALONE_COMPONENTS.items() if "--skip-serve-logs" in flags}


def api_address(environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Where the api-server listens: $AIRFLOW__API__HOST / $AIRFLOW__API__PORT, else 127.0.0.1:8080."""
    env = os.environ if environ is None else environ
    return env.get("AIRFLOW__API__HOST") or LOOPBACK, int(env.get("AIRFLOW__API__PORT") or DEFAULT_API_PORT)


def client_host(host: str) -> str:
    """The address a local client dials for a server bound to ``host`` (a wildcard -> loopback)."""
    return LOOPBACK if host in ("", "0.0.0.0", "::", "[::]") else host


def health_url(env: Mapping[str, str]) -> str:
    """The api-server's health endpoint (Airflow 3: /api/v2/monitor/health)."""
    host, port = api_address(env)
    return f"http://{client_host(host)}:{port}/api/v2/monitor/health"


def password_file(env: Mapping[str, str]) -> Path:
    """Where the simple auth manager keeps the generated admin password."""
    configured = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
    return Path(configured) if configured else Path(env["AIRFLOW_HOME"]) / PASSWORD_FILE_NAME


def airflow_env(cfg: PipelineConfig, home: Path | None = None, host: str | None = None,
                port: int | None = None) -> dict[str, str]:
    """Environment for a project-local Airflow with SQLite and the spark_default connection.

    The api-server binds ``host`` (default: $AIRFLOW__API__HOST, else 127.0.0.1) and ``port``;
    task runners reach its execution API there (not on ``localhost``, which may be ::1)."""
    home = home or Path(os.environ.get("AIRFLOW_HOME") or AIRFLOW_HOME)
    policy = policy_for(cfg)
    venv_bin = str(Path(sys.executable).parent)
    default_host, default_port = api_address()
    host = host or default_host
    port = port or default_port
    return {
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        # One api-server worker fits the small machines the embedded mode runs on.
        "AIRFLOW__API__WORKERS": os.environ.get("AIRFLOW__API__WORKERS", "1"),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{client_host(host)}:{port}/execution/",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": str(cfg.airflow.parallelism),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(cfg.airflow.parallelism),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR": "False",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        # local[*] becomes local[<the thread policy's Spark cores>] (core.threads).
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": spark_master(
            cfg.spark.master, policy.spark_cores)}),
        "MMN_CONFIG": str(cfg.source),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "NO_PROXY": "*",
        # The thread policy's OMP_WAIT_POLICY / OMP_NUM_THREADS: libgomp reads them when a task
        # process first imports torch, so they must be in the environment Airflow starts with.
        **process_env(policy),
    }


def apply(cfg: PipelineConfig, environ: MutableMapping[str, str] | None = None, host: str | None = None,
          port: int | None = None) -> dict[str, str]:
    """Set the embedded Airflow environment (before airflow is imported) and return it."""
    env = airflow_env(cfg, host=host, port=port)
    target = os.environ if environ is None else environ
    target.update(env)
    secure_home(env)
    return env


def secure_home(env: Mapping[str, str]) -> Path:
    """Create AIRFLOW_HOME private to its owner (airflow.cfg holds generated secrets) and the
    admin password file with mode 600 before Airflow writes it (Airflow keeps the mode of an
    existing file; a new one would get the umask's, usually world-readable)."""
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    path = password_file(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    path.chmod(0o600)
    return path
