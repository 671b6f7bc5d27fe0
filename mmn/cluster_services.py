"""The processes and HTTP calls of the native scale-out stack (mmn.cluster): a service in its
own process group with a log file and a clean stop, readiness polling, one-shot commands,
the machine's TCP listeners (``ss``), and the Airflow api-server's REST API with a JWT."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])

# ---------------------------------------------------------------- HTTP


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


def http(method: str, url: str, body: Any = None, headers: Mapping[str, str] | None = None,
         timeout: float = 30) -> tuple[int, Any]:
    """(status, decoded JSON or text); HTTP errors are returned, connection errors raise OSError."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def http_ok(url: str) -> bool:
    try:
        return http("GET", url, timeout=5)[0] == 200
    except OSError:
        return False


class AirflowAPI:
    """The api-server's public REST API (/api/v2) with a JWT from the simple auth manager."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url, self.username, self.password = base_url.rstrip("/"), username, password
        self._token: str | None = None

    def token(self) -> str:
        status, body = http("POST", f"{self.base_url}/auth/token",
                            {"username": self.username, "password": self.password})
        if status not in (200, 201):
            raise RuntimeError(f"POST /auth/token: HTTP {status}: {body}")
        self._token = body["access_token"]
        return self._token

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self._token or self.token()}"}
        return http(method, f"{self.base_url}/api/v2{path}", body, headers)

    def trigger(self, dag_id: str, run_id: str, interval_start: Any, interval_end: Any,
                conf: Mapping[str, Any] | None = None) -> dict[str, Any]:
        status, body = self.call("POST", f"/dags/{dag_id}/dagRuns", {
            "dag_run_id": run_id, "logical_date": interval_start.isoformat(),
            "data_interval_start": interval_start.isoformat(), "data_interval_end": interval_end.isoformat(),
            "conf": dict(conf or {})})
        if status != 200:
            raise RuntimeError(f"trigger {dag_id} {run_id}: HTTP {status}: {body}")
        return body


# ---------------------------------------------------------------- processes


@dataclass
class Service:
    """One long-running process in its own process group, logging to a file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path | None = None
    user: tuple[int, int] | None = None
    proc: subprocess.Popen[bytes] | None = None
    stopped: str = ""

    def start(self) -> Service:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         **as_user(self.user))
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 30.0) -> str:
        """SIGTERM to the service's main process (it stops its own workers, as Airflow's scheduler
        does its executor's), then to whatever of its tree and group outlives it; SIGKILL what
        outlives that. Returns ``clean`` (no SIGKILL needed), ``killed …`` or ``exited <code>``."""
        import psutil

        if self.proc is None:
            return "never started"
        if self.stopped:
            return self.stopped
        if self.proc.poll() is not None:
            self.stopped = f"exited {self.proc.returncode}"
            return self.stopped
        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _killpg(self.proc.pid, signal.SIGTERM)
        for p in tree:
            _signal(p, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=10)
        alive = [p for p in alive if _alive(p)]
        self.stopped = "clean"
        if alive or self.proc.poll() is None:
            self.stopped = "killed " + ", ".join(f"{p.pid}" for p in alive)
            _killpg(self.proc.pid, signal.SIGKILL)
            for p in alive:
                _signal(p, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.stopped


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def as_user(user: tuple[int, int] | None) -> dict[str, Any]:
    return {} if user is None else {"user": user[0], "group": user[1], "extra_groups": []}


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(proc: Any, sig: int) -> None:
    import psutil

    try:
        proc.send_signal(sig)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


def wait_until(what: str, check: Callable[[], bool], timeout_s: float, services: Sequence[Service] = (),
               every_s: float = 1.0) -> None:
    """Poll ``check`` until true; fail naming ``what`` (and a dead service's log tail) otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        for svc in services:
            if not svc.running():
                raise RuntimeError(f"{svc.name} exited while waiting for {what}; its log {svc.log}:\n{svc.tail()}")
        time.sleep(every_s)
    tails = "\n".join(f"--- {s.name} ({s.log}):\n{s.tail(15)}" for s in services)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")


def run_logged(argv: Sequence[str], env: Mapping[str, str], log: Path, timeout_s: float,
               user: tuple[int, int] | None = None, cwd: Path | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.run(list(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout_s, cwd=cwd, **as_user(user))
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(map(str, argv[:3]))} failed (exit {proc.returncode}); {log}:\n{tail}")


def listeners() -> list[tuple[str, int, str]]:
    """Every listening TCP socket on the machine as (address, port, ss's process column)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        addr, _, port = cols[3].rpartition(":")
        found.append((addr.strip("[]"), int(port), " ".join(cols[5:])))
    return found
