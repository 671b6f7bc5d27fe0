"""One configuration, two modes: docker-compose.yml and the native stack (mmn.cluster) in step.

The cluster test (tests/test_cluster.py) runs the scale-out mode as native processes; this
checks, without starting anything, that those processes get every setting the compose file
gives its containers: each ``MMN__*`` / ``AIRFLOW*`` / ``MLFLOW_*`` / ``SPARK_*`` variable of
the Airflow, MLflow and Spark services, and each flag of the MLflow server's command, with
the same value once a container address (``http://mlflow:5000``, a volume path, a
``${SECRET}`` from .env, a port inside the compose network) is replaced by its native
counterpart. The only exceptions are mmn.cluster.DIFFERENCES, each with its reason.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex

import pytest
import yaml

from core.config import REPO_ROOT
from mmn.cluster import COMPOSE_ADDRESSES, COMPOSE_PORTS, DIFFERENCES, NativeStack

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())  # anchors and << merged
SERVICES = COMPOSE["services"]
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-init")
SETTING = re.compile(r"^(MMN__|AIRFLOW|MLFLOW_|SPARK_|PYSPARK_)")


@pytest.fixture()
def stack(tmp_path) -> NativeStack:
    return NativeStack(tmp_path / "stack")  # addresses, secrets and environments; nothing started


def substitute(text: str, stack: NativeStack) -> str:
    """Compose's variables: ``${NAME:?message}`` is a secret of .env, ``${NAME:-x}`` a default."""
    return re.sub(r"\$\{([A-Z_]+):([?-])([^}]*)\}",
                  lambda m: stack.secrets[m.group(1)] if m.group(2) == "?" else m.group(3), text)


def translate(value: object, stack: NativeStack) -> str:
    """A compose value as the native stack must have it."""
    text = substitute(str(value), stack)
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):  # a connection: translate its fields, its port by COMPOSE_PORTS
        return json.dumps({k: stack.ports[COMPOSE_PORTS[v]] if k == "port" else translate(v, stack)
                           for k, v in parsed.items()})
    for compose, attr in COMPOSE_ADDRESSES.items():
        text = text.replace(compose, getattr(stack, attr))
    return text


def _same(native: str, expected: str) -> bool:
    try:
        return json.loads(native) == json.loads(expected)
    except ValueError:
        return native == expected


def _check_env(compose_env: dict, native_env: dict, stack: NativeStack, where: str) -> list[str]:
    problems = []
    for key, value in compose_env.items():
        if not SETTING.match(key):
            continue
        if key not in native_env:
            problems.append(f"{where}: {key} is set by the compose file, not by the native stack")
        elif key not in DIFFERENCES and not _same(native_env[key], translate(value, stack)):
            problems.append(f"{where}: {key}: native {native_env[key]!r} != compose {translate(value, stack)!r}")
    return problems


def test_every_airflow_setting_of_the_compose_file_is_set_natively(stack):
    native = stack.airflow_env()
    problems = []
    for name in AIRFLOW_SERVICES:
        env = {k: v for k, v in SERVICES[name]["environment"].items() if k != "AIRFLOW_ADMIN_PASSWORD"}
        problems += _check_env(env, native, stack, name)
    assert not problems, "\n".join(problems)
    # The api-server's own secret is the admin password the native stack writes for it.
    assert "AIRFLOW_ADMIN_PASSWORD" in SERVICES["airflow-apiserver"]["environment"]
    assert "AIRFLOW_ADMIN_PASSWORD" in stack.secrets


def test_every_setting_of_the_spark_and_mlflow_services_is_set_natively(stack):
    problems = _check_env(SERVICES["spark-master"]["environment"], stack.spark_env(), stack, "spark-master")
    problems += _check_env(SERVICES["spark-worker"]["environment"], stack.spark_env(worker=True), stack,
                           "spark-worker")
    problems += _check_env(SERVICES["mlflow"]["environment"], stack.mlflow_env(), stack, "mlflow")
    assert not problems, "\n".join(problems)


def _flags(argv: list[str]) -> dict[str, str]:
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}


def test_the_mlflow_server_runs_the_compose_command(stack):
    compose = shlex.split(substitute(SERVICES["mlflow"]["command"], stack))
    native = stack.mlflow_argv()
    assert compose[:2] == ["mlflow", "server"] and native[1:3] == ["server", "--app-name"]
    ours = _flags(native)
    for flag, value in _flags(compose).items():
        assert flag in ours, f"the compose file runs mlflow server {flag}, the native stack does not"
        if flag == "--port":
            assert ours[flag] == str(stack.ports[COMPOSE_PORTS[int(value)]])
        elif flag not in DIFFERENCES:
            assert ours[flag] == translate(value, stack), flag
    assert ours["--host"] == "127.0.0.1"


def test_the_auth_config_is_the_compose_files_with_the_users_db_moved(stack):
    path = stack.write_auth_config()
    ours, theirs = configparser.ConfigParser(), configparser.ConfigParser()
    ours.read(path)
    theirs.read(REPO_ROOT / "docker" / "mlflow-basic-auth.ini")
    assert ours["mlflow"]["database_uri"].startswith(f"sqlite:///{stack.root}")
    assert {k: v for k, v in ours["mlflow"].items() if k != "database_uri"} == \
        {k: v for k, v in theirs["mlflow"].items() if k != "database_uri"}


def test_the_spark_and_airflow_services_are_the_compose_files(stack):
    """Same programs: the Spark daemons' classes, Airflow's components (the triggerer aside)."""
    assert "org.apache.spark.deploy.master.Master" in SERVICES["spark-master"]["command"]
    assert "org.apache.spark.deploy.worker.Worker" in SERVICES["spark-worker"]["command"]
    source = (REPO_ROOT / "mmn" / "cluster.py").read_text()
    for cls in ("org.apache.spark.deploy.master.Master", "org.apache.spark.deploy.worker.Worker"):
        assert cls in source
    for command in ("api-server", "scheduler", "dag-processor"):
        assert f'"{command}"' in source
    assert "airflow triggerer" in SERVICES["airflow-triggerer"]["command"] and "airflow-triggerer" in DIFFERENCES
    assert "airflow db migrate" in SERVICES["airflow-init"]["command"]


def test_the_cluster_test_runs_the_compose_values_not_its_own():
    """Its small-day overrides never shadow a setting the compose file makes."""
    from tests.test_cluster import SMALL

    compose_keys = {k for name in SERVICES for k in (SERVICES[name].get("environment") or {})}
    assert not set(SMALL) & compose_keys
    assert all(k.startswith("MMN__") for k in SMALL)


def test_every_difference_names_a_real_setting():
    compose_text = (REPO_ROOT / "docker-compose.yml").read_text()
    for key, reason in DIFFERENCES.items():
        assert key in compose_text, key
        assert len(reason) > 20
