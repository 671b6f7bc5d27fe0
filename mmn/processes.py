"""The server commands' process trees (`mmn serve`, `mmn mlflow-ui`, `mmn airflow standalone`):
start children in their own group, wait for a health check, and on SIGTERM / SIGINT / SIGHUP
stop every descendant (SIGKILL after a grace period), orphans included."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any


class _Stop(Exception):
    """A stop signal (SIGTERM, SIGINT, SIGHUP) arrived while servers were running."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _become_subreaper() -> None:
    """Adopt orphaned descendants (Linux), so a server's workers whose parent died are
    still ours to stop instead of being reparented to init and left listening."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


class ProcessTree:
    """The server processes one `mmn` command starts, and all of their descendants.

    A server's parent process does not always stop its children (`airflow standalone`
    leaves its components running on SIGTERM, `mlflow server` its job consumers), so on
    SIGTERM, SIGINT or SIGHUP, or when one server exits, every descendant of this process
    gets SIGTERM, then SIGKILL after ``grace_s``."""

    def __init__(self, grace_s: float = 20.0) -> None:
        self.grace_s = grace_s
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        _become_subreaper()

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              log_path: Path | None = None) -> subprocess.Popen[bytes]:
        out = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            out = log_path.open("ab")
        try:
            proc = subprocess.Popen(list(argv), env=dict(env) if env is not None else None, stdout=out,
                                    stderr=subprocess.STDOUT if out else None)
        finally:
            if out is not None:
                out.close()
        self.procs[name] = proc
        return proc

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
        """Run one command to completion (e.g. a migration), stoppable by the same signals."""
        with _stop_signals():
            try:
                return subprocess.Popen(list(argv), env=dict(env) if env is not None else None).wait()
            except _Stop as stop:
                self.stop()
                return 128 + stop.signum

    def wait(self, ready: Callable[[], bool] | None = None, on_ready: Callable[[], None] | None = None) -> int:
        """Block until a stop signal (exit 0) or until one server exits (its exit code, at least 1)."""
        announced = ready is None
        with _stop_signals():
            try:
                while True:
                    for name, proc in self.procs.items():
                        code = proc.poll()
                        if code is not None:
                            print(f"mmn: {name} exited with code {code}; stopping the rest", file=sys.stderr)
                            return code or 1
                    if not announced and ready is not None and ready():
                        announced = True
                        if on_ready is not None:
                            on_ready()
                    time.sleep(0.5)
            except _Stop as stop:
                print(f"mmn: {stop}: stopping {', '.join(self.procs)}", file=sys.stderr)
                return 0
            finally:
                self.stop()

    def stop(self) -> None:
        """SIGTERM the direct children, then every remaining descendant; SIGKILL what outlives the grace."""
        import psutil

        for sig in STOP_SIGNALS:  # the cleanup runs to its end
            signal.signal(sig, signal.SIG_IGN)
        me = psutil.Process()
        direct = me.children()
        for proc in direct:
            _signal(proc, signal.SIGTERM)
        _, alive = psutil.wait_procs(direct, timeout=self.grace_s)
        rest = [p for p in me.children(recursive=True) if p not in alive] + alive
        for proc in rest:
            _signal(proc, signal.SIGTERM)
        _, alive = psutil.wait_procs(rest, timeout=5)
        for proc in alive + me.children(recursive=True):
            _signal(proc, signal.SIGKILL)
        psutil.wait_procs(me.children(recursive=True), timeout=5)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextmanager
def _stop_signals() -> Iterator[None]:
    """Stop signals raise :class:`_Stop` in the main thread while inside; the first one makes
    the rest ignored, so the cleanup it starts is not cut short. Old handlers come back after."""

    def raise_stop(signum: int, _frame: FrameType | None) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise _Stop(signum)

    saved = {sig: signal.signal(sig, raise_stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _signal(proc: Any, signum: int) -> None:
    import psutil

    try:
        proc.send_signal(signum)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
