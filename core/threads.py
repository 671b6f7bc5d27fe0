"""The thread policy: how many CPU threads a task may use, and how its OpenMP threads wait.

Why: the Airflow LocalExecutor runs ``airflow.parallelism`` tasks at once (and backfills,
the comparison DAG and a Spark worker share the host). Torch's default (one intra-op thread
per core, OpenMP threads that spin while they wait) fell off a 35x cliff beside a Spark
build on 2 cores: libgomp's spinning threads took turns with Spark's (issue 19). The policy:

* **threads** (``runtime.threads``): ``auto`` = the CPUs this process may use (the cgroup's
  CPU quota, v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``, and the
  scheduler affinity mask, whichever is smaller) divided among the tasks the executor runs
  at once (``airflow.parallelism``), at least 1; or a fixed count. Training, evaluation and
  serving set torch's intra-op threads to it, inter-op threads to 1.
* **OMP_WAIT_POLICY** (``runtime.omp_wait_policy``): libgomp reads it once, when it starts,
  so it must be in the environment before torch is imported: :func:`process_env` gives the
  variables, set by the ``mmn`` CLI at process start, by the embedded Airflow environment
  (inherited by every task process) and in spark-submit's environment.
* **Spark cores** (``runtime.spark_cores``): ``auto`` = the same per-task CPU count, as
  ``local[N]`` in place of ``local[*]`` (an explicit ``local[N]`` is kept) and
  ``spark.cores.max`` for a cluster master.

Chosen by measurement: docs/benchmarks.md, "Thread policy on a shared machine (issue 19)".
This module imports no torch at import time (core stays light); :func:`apply_torch_threads`
imports it when called.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
WAIT_POLICIES = ("active", "passive")
AUTO = "auto"
_LOCAL_MASTER = re.compile(r"local\[(\d+|\*)(,\s*\d+)?\]|local")
_logged = False


# ------------------------------------------------------------------ how many CPUs


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line (``"<quota> <period>"``; ``max``: none)."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = float(parts[1]) if len(parts) > 1 else 100_000.0
    quota = float(parts[0])
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_text: str | None, period_text: str | None) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none)."""
    if quota_text is None or period_text is None:
        return None
    quota, period = float(quota_text), float(period_text)
    return quota / period if quota > 0 and period > 0 else None


def _cgroup_dirs(root: Path, relative: str) -> list[Path]:
    """The cgroup's directory and its ancestors up to ``root`` (a limit anywhere above
    applies too); a container that mounts its own cgroup at ``root`` has only ``root``."""
    rel = relative.strip("/")
    dirs = []
    parts = rel.split("/") if rel else []
    for depth in range(len(parts), -1, -1):
        candidate = root.joinpath(*parts[:depth])
        if candidate.is_dir():
            dirs.append(candidate)
    return dirs or [root]


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """CPUs this process's cgroup may use (the smallest quota on its path), None if unlimited.

    cgroup v2: the ``0::<path>`` line of /proc/self/cgroup and ``cpu.max`` files; v1: the line
    naming the ``cpu`` controller and ``cpu/cpu.cfs_quota_us`` (or ``cpu,cpuacct/...``)."""
    text = _read(self_cgroup)
    if text is None:
        return None
    limits: list[float] = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2 unified hierarchy
            for d in _cgroup_dirs(root, relative):
                found = _read(d / "cpu.max")
                value = parse_cpu_max(found) if found else None
                if value is not None:
                    limits.append(value)
        elif "cpu" in controllers.split(","):  # v1 cpu controller
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if not mount.is_dir():
                    continue
                for d in _cgroup_dirs(mount, relative):
                    value = parse_cfs(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us"))
                    if value is not None:
                        limits.append(value)
                break
    return min(limits) if limits else None


def affinity_cpus(getaffinity: Callable[[int], Any] | None = None) -> int:
    """CPUs in this process's scheduler affinity mask (os.cpu_count() where unsupported)."""
    get = getaffinity or getattr(os, "sched_getaffinity", None)
    if get is None:
        return os.cpu_count() or 1
    try:
        return max(1, len(get(0)))
    except OSError:
        return os.cpu_count() or 1


def usable_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP,
                getaffinity: Callable[[int], Any] | None = None) -> tuple[int, dict[str, Any]]:
    """(whole CPUs this process may use, the sources): min(affinity, ceil(cgroup quota))."""
    affinity = affinity_cpus(getaffinity)
    quota = cgroup_cpu_limit(root, self_cgroup)
    cpus = affinity if quota is None else max(1, min(affinity, math.ceil(quota - 1e-9)))
    return cpus, {"affinity": affinity, "cgroup_quota": quota}


# ------------------------------------------------------------------ the policy


@dataclass(frozen=True)
class ThreadPolicy:
    """What one task process uses: intra-op threads, OpenMP wait policy, Spark cores."""

    threads: int
    interop_threads: int
    omp_wait_policy: str
    spark_cores: int
    explain: str

    def describe(self) -> str:
        return (f"thread policy: {self.threads} intra-op thread(s), {self.interop_threads} inter-op, "
                f"OMP_WAIT_POLICY={self.omp_wait_policy}, Spark cores {self.spark_cores} ({self.explain})")


def _count(value: Any, key: str) -> int | None:
    if value == AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be 'auto' or an integer >= 1, got {value!r}")
    return value


def resolve_policy(runtime: Any, concurrent_tasks: int, cpus: tuple[int, dict[str, Any]] | None = None,
                   ) -> ThreadPolicy:
    """The policy for ``runtime`` (core.config.Runtime: threads, omp_wait_policy, spark_cores)
    with ``concurrent_tasks`` tasks sharing the CPUs (``airflow.parallelism``)."""
    usable, sources = cpus if cpus is not None else usable_cpus()
    tasks = max(1, int(concurrent_tasks))
    share = max(1, usable // tasks)
    fixed = _count(runtime.threads, "runtime.threads")
    threads = fixed if fixed is not None else share
    spark_fixed = _count(runtime.spark_cores, "runtime.spark_cores")
    spark_cores = spark_fixed if spark_fixed is not None else share
    policy = str(runtime.omp_wait_policy).lower()
    if policy not in WAIT_POLICIES:
        raise ValueError(f"runtime.omp_wait_policy must be one of {WAIT_POLICIES}, got {policy!r}")
    quota = sources.get("cgroup_quota")
    explain = (f"{usable} usable CPU(s): affinity {sources.get('affinity')}, cgroup quota "
               f"{'none' if quota is None else f'{quota:g}'}; {tasks} concurrent task(s)"
               + ("" if fixed is None else f"; runtime.threads={fixed}"))
    return ThreadPolicy(threads=threads, interop_threads=1, omp_wait_policy=policy,
                        spark_cores=spark_cores, explain=explain)


def policy_for(cfg: Any) -> ThreadPolicy:
    """The policy of a PipelineConfig (its ``runtime`` section, ``airflow.parallelism``)."""
    return resolve_policy(cfg.runtime, cfg.airflow.parallelism)


def process_env(policy: ThreadPolicy) -> dict[str, str]:
    """Environment variables a process needs before torch / libgomp / MKL start."""
    return {"OMP_WAIT_POLICY": policy.omp_wait_policy.upper(), "OMP_NUM_THREADS": str(policy.threads),
            "MKL_NUM_THREADS": str(policy.threads)}


def set_process_env(policy: ThreadPolicy, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put :func:`process_env` into ``environ`` (default os.environ), keeping any value the
    operator already exported; returns what is in effect. Call before torch is imported."""
    env = os.environ if environ is None else environ
    for key, value in process_env(policy).items():
        env.setdefault(key, value)
    return {key: env[key] for key in process_env(policy)}


def spark_master(master: str, cores: int) -> str:
    """``local[*]`` / ``local`` with the policy's cores; any other master unchanged."""
    found = _LOCAL_MASTER.fullmatch(master.strip())
    if found and (found.group(1) in (None, "*")):
        return f"local[{cores}]" if found.group(2) is None else f"local[{cores}{found.group(2)}]"
    return master


def spark_conf(policy: ThreadPolicy, master: str) -> dict[str, str]:
    """Spark settings of the policy: the executors' OpenMP wait policy, and spark.cores.max
    (the cores an application takes) for a cluster master."""
    conf = {f"spark.executorEnv.{k}": v for k, v in process_env(policy).items()}
    if not master.strip().startswith("local"):
        conf["spark.cores.max"] = str(policy.spark_cores)
    return conf


def apply_torch_threads(policy: ThreadPolicy, threads: int | None = None) -> int:
    """Set torch's intra-op threads (``threads`` overrides the policy's) and inter-op threads
    (once per process: torch refuses a second call); log the policy once. Returns the count."""
    global _logged
    import torch

    count = max(1, int(threads if threads is not None else policy.threads))
    torch.set_num_threads(count)
    try:
        if torch.get_num_interop_threads() != policy.interop_threads:
            torch.set_num_interop_threads(policy.interop_threads)
    except RuntimeError:  # inter-op work already started in this process; it keeps its pool
        pass
    if not _logged:
        _logged = True
        wait = os.environ.get("OMP_WAIT_POLICY", "unset (libgomp's default: active)")
        log.info("%s; torch: %d intra-op, %d inter-op; OMP_WAIT_POLICY in this process: %s",
                 policy.describe(), torch.get_num_threads(), torch.get_num_interop_threads(), wait)
    return count


def configure_process(cfg: Any, environ: MutableMapping[str, str] | None = None) -> ThreadPolicy:
    """At process start (before torch is imported): set the policy's environment and log it
    (the once-per-process log line; :func:`apply_torch_threads` then stays quiet)."""
    global _logged
    policy = policy_for(cfg)
    effective = set_process_env(policy, environ)
    if not _logged:
        _logged = True
        log.info("%s; environment: %s", policy.describe(), " ".join(f"{k}={v}" for k, v in effective.items()))
    return policy
