"""The Makefile's server targets work on a fresh clone, on loopback, and stop cleanly.

Each test runs `make <target> PORT=<free port>` the way a user does (the venv not activated:
its bin/ is taken off PATH), waits for the server's health endpoint on 127.0.0.1, checks
that every listening socket of the started processes is on 127.0.0.1, stops it and asserts
that no process and no listening socket is left. `make` is told the venv is current
(``-o .venv/.installed``) so a test never reinstalls packages.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from core.config import REPO_ROOT, load_config
from mmn.processes import http_ok

STAMP = ".venv/.installed"
LOOPBACK_ADDRESSES = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bare_env(**extra: str) -> dict[str, str]:
    """The test session's environment without the venv on PATH, as in a fresh shell."""
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env.update(extra)
    return env


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _listening(procs: list[psutil.Process]) -> list[tuple[str, int, str]]:
    found = []
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((conn.laddr.ip, conn.laddr.port, proc.name()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _port_listens(port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
               for c in psutil.net_connections(kind="inet"))


class Launched:
    """A `make` target running in its own session, with its output in a log file."""

    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc = proc
        self.log = log
        self.seen: dict[int, psutil.Process] = {}

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def snapshot(self) -> list[psutil.Process]:
        """Every process of the launch now; remembered, so the final check covers them all."""
        procs = _tree(self.proc.pid)
        self.seen.update({p.pid: p for p in procs})
        return procs

    def wait_healthy(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.snapshot()
            if http_ok(url):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"make exited with {self.proc.returncode} before {url} answered:\n{self.output()}")
            time.sleep(1)
        pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{self.output()}")

    def survivors(self, timeout: float) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        while True:
            alive = [p for p in self.seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)


@contextmanager
def launch(tmp_path: Path, target: str, port: int, env: dict[str, str]) -> Iterator[Launched]:
    log = tmp_path / f"{target}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["make", "--no-print-directory", "-o", STAMP, target, f"PORT={port}"],
                                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    launched = Launched(proc, log)
    try:
        yield launched
    finally:  # the safety net: whatever a test left running goes
        launched.snapshot()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            for p in launched.survivors(10 if sig == signal.SIGTERM else 5):
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
        proc.wait(timeout=10)


def _stop_group_and_check(launched: Launched, port: int) -> None:
    """Process group SIGTERM (what a terminal's Ctrl-C or a supervisor does); all must end."""
    launched.snapshot()
    os.killpg(launched.proc.pid, signal.SIGTERM)
    launched.proc.wait(timeout=40)
    alive = launched.survivors(30)
    assert not alive, f"still running after SIGTERM: {[(p.pid, p.name()) for p in alive]}\n{launched.output()}"
    assert not _port_listens(port), f"port {port} still listens after the stop"


def _assert_loopback_only(procs: list[psutil.Process], port: int) -> None:
    sockets = _listening(procs)
    assert any(p == port for _, p, _ in sockets), f"nothing of the launch listens on {port}: {sockets}"
    exposed = [s for s in sockets if s[0] not in LOOPBACK_ADDRESSES]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_make_mlflow_ui_without_the_venv_on_path(tmp_path):
    port = _free_port()
    env = _bare_env(MMN__MLFLOW__TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with launch(tmp_path, "mlflow-ui", port, env) as ui:
        ui.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=90)
        procs = ui.snapshot()
        _assert_loopback_only(procs, port)
        # A worker count that fits a small machine: one uvicorn worker, no job consumers.
        workers = [p for p in procs if "uvicorn" in " ".join(p.cmdline()) and "--workers" in p.cmdline()]
        assert workers and all(p.cmdline()[p.cmdline().index("--workers") + 1] == "1" for p in workers)
        assert not [p for p in procs if "huey" in " ".join(p.cmdline())], "job consumers were started"
        _stop_group_and_check(ui, port)


@pytest.fixture(scope="module")
def champion_store(tmp_path_factory) -> tuple[str, str]:
    """An MLflow store with a tiny model logged but not promoted, and the URI to promote it."""
    from tests.test_serving_errors import log_tiny_model

    root = tmp_path_factory.mktemp("serve")
    cfg = load_config().with_overrides({"mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}"})
    return cfg.mlflow.tracking_uri, log_tiny_model(cfg)


def test_make_serve_without_a_champion_fails_with_a_clear_message(tmp_path, champion_store):
    uri, _ = champion_store
    for store in (f"sqlite:///{tmp_path / 'absent.db'}", uri):
        result = subprocess.run(["make", "--no-print-directory", "-o", STAMP, "serve", f"PORT={_free_port()}"],
                                cwd=REPO_ROOT, env=_bare_env(MMN__MLFLOW__TRACKING_URI=store),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert "mmn serve: error:" in result.stderr and "champion" in result.stderr, result.stderr
        assert "make demo" in result.stderr and "Traceback" not in result.stderr
    assert not Path(tmp_path / "absent.db").exists(), "checking for a champion created a store"


def test_make_serve_answers_ping_on_loopback(tmp_path, champion_store):
    import mlflow
    from mlflow import MlflowClient

    uri, model_uri = champion_store
    name = load_config().mlflow.registered_model
    version = mlflow.register_model(model_uri, name)
    MlflowClient(uri, uri).set_registered_model_alias(name, "champion", version.version)
    port = _free_port()
    with launch(tmp_path, "serve", port, _bare_env(MMN__MLFLOW__TRACKING_URI=uri)) as server:
        server.wait_healthy(f"http://127.0.0.1:{port}/ping", timeout=120)
        _assert_loopback_only(server.snapshot(), port)
        _stop_group_and_check(server, port)


def test_make_airflow_ui_on_loopback_and_sigterm_to_it_stops_every_component(tmp_path):
    port = _free_port()
    home = tmp_path / "airflow"
    env = _bare_env(AIRFLOW_HOME=str(home))
    for key in ("AIRFLOW__API__HOST", "AIRFLOW__API__PORT", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"):
        env.pop(key, None)
    with launch(tmp_path, "airflow-ui", port, env) as airflow:
        airflow.wait_healthy(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=240)
        time.sleep(3)  # the scheduler and triggerer would have opened their log servers by now
        procs = airflow.snapshot()
        _assert_loopback_only(procs, port)
        assert not [s for s in _listening(procs) if s[1] in (8793, 8794)], "a log server is listening"
        password_file = home / "simple_auth_manager_passwords.json.generated"
        assert password_file.stat().st_mode & 0o777 == 0o600
        assert home.stat().st_mode & 0o077 == 0
        # SIGTERM to the standalone parent alone (not its group) stops every component.
        mmn = [p for p in procs if p.pid != airflow.proc.pid and "mmn" in " ".join(p.cmdline()[:2])]
        assert mmn, [p.cmdline() for p in procs]
        mmn[0].send_signal(signal.SIGTERM)
        alive = [p for p in airflow.survivors(45) if p.pid != airflow.proc.pid]
        assert not alive, f"still running: {[(p.pid, p.cmdline()[:3]) for p in alive]}\n{airflow.output()}"
        assert not _port_listens(port)
