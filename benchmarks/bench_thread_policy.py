"""MMN training speed alone vs beside a running Spark build, per thread policy (issue 19).

Why: torch's defaults (one intra-op thread per core, OpenMP threads that spin-wait) fell from
~9k to 270 samples/s beside a Spark build on 2 cores. This measures, for every
{OMP_WAIT_POLICY active, passive} x {1, 2 intra-op threads}, the fast-MMN full training
step (21 x 17 domains, batch 1024, configured towers; bench_mmn_training's TrainRunner)
solo and while the real Spark build of a generated day runs beside it (spark-submit of
spark_jobs/build_samples.py, restarted whenever it finishes), and the shared/solo ratio.

Each configuration runs in its own process (libgomp reads OMP_WAIT_POLICY once, at start).
The machine may be noisy: every round measures all configurations solo and shared,
interleaved, with the configuration order rotated and the solo/shared order alternated; a
ratio is taken within its round and the median over rounds is reported, with the Spark
tree's CPU use during each shared window (to show it was busy) and the load average.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_thread_policy.py [--rounds 3] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for entry in (str(REPO_ROOT), str(REPO_ROOT / "benchmarks")):
    if entry not in sys.path:
        sys.path.insert(0, entry)

DAY = "2026-11-01"
CONFIGS = [("active", 1), ("active", 2), ("passive", 1), ("passive", 2)]


# ---------------------------------------------------------------- the training worker


def worker(threads: int, seconds: float, shape: str, overrides: Sequence[str]) -> None:
    """One configuration (its OMP_WAIT_POLICY already in the environment): prints JSON."""
    import torch
    from bench_mmn_training import TrainRunner

    from core.config import load_config

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    cfg = load_config(overrides=list(overrides))
    n_types, n_scenarios = (int(v) for v in shape.split("x"))
    runner = TrainRunner(cfg, "mmn", False, n_types, n_scenarios, torch.device("cpu"))
    runner.run(2, record=False)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(runner.times) < 2:
        runner.run(1)
    elapsed = time.perf_counter() - start
    print(json.dumps({"samples_per_s": cfg.training.batch_size * len(runner.times) / elapsed,
                      "median_step_ms": statistics.median(runner.times) * 1e3,
                      "max_step_ms": max(runner.times) * 1e3, "steps": len(runner.times)}))


def run_worker(policy: str, threads: int, seconds: float, shape: str, overrides: Sequence[str]) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": policy.upper(), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--seconds", str(seconds),
                          "--shape", shape, *[a for o in overrides for a in ("--set", o)]],
                         env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the Spark build beside it


def _tree_cpu_seconds(pid: int) -> float:
    """utime + stime (s) of a process and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry))
    tick = os.sysconf("SC_CLK_TCK")
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        stack += children.get(p, [])
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / tick
    return total


class SparkLoop:
    """The Spark build of one generated day, rerun back to back until stopped."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.cmd, self.env = cmd, env
        self.proc: subprocess.Popen | None = None
        self.stopped = threading.Event()
        self.builds = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stopped.is_set():
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
            self.proc.wait()
            self.builds += 1

    def start(self, settle: float) -> None:
        """Start, then wait until the JVM is past its start-up (using > 1 CPU-second per second)."""
        self.thread.start()
        time.sleep(settle)
        deadline = time.monotonic() + 3 * settle
        while time.monotonic() < deadline:
            before = self.cpu()
            time.sleep(1.0)
            if self.cpu() - before > 1.0:
                return

    def cpu(self) -> float:
        return _tree_cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        self.stopped.set()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # the spark-submit session this loop started
        self.thread.join(timeout=30)


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per configuration")
    parser.add_argument("--shape", default="21x17")
    parser.add_argument("--impressions", type=int, default=150_000, help="the Spark build's generated day")
    parser.add_argument("--spark-master", default="local[2]", help="the build beside training (old default: all cores)")
    parser.add_argument("--configs", default=",".join(f"{p}/{t}" for p, t in CONFIGS),
                        help="POLICY/THREADS comma list (default: all four)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.seconds, args.shape, args.overrides)
        return 0
    configs = [(p, int(t)) for p, t in (c.split("/") for c in args.configs.split(","))]

    from core.config import load_config
    from mmn.tasks import spark_submit_conf

    work = Path(tempfile.mkdtemp(prefix="mmn-threads-"))
    data = [f"paths.raw_root={work / 'raw'}", f"paths.lake_root={work / 'lake'}",
            f"paths.truth_root={work / 'truth'}", f"spark.master={args.spark_master}"]
    config_path = str(load_config().source)
    cfg = load_config(config_path, overrides=data)
    py = sys.executable
    env = {**os.environ, "PYSPARK_PYTHON": py, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(REPO_ROOT)}
    set_args = [a for o in data for a in ("--set", o)]
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}; cpus: {os.cpu_count()}", flush=True)
    results: dict[str, object] = {"shape": args.shape, "seconds": args.seconds, "load_start": load_start,
                                  "spark_master": args.spark_master, "impressions": args.impressions,
                                  "rounds": []}
    try:
        subprocess.run([py, "-m", "simulation.generate_logs", "--start", DAY, "--days", "1",
                        "--impressions-per-day", str(args.impressions), "--config", config_path, *set_args],
                       env=env, cwd=REPO_ROOT, check=True, capture_output=True)
        submit = shutil.which("spark-submit", path=f"{Path(py).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        conf = {**spark_submit_conf(cfg), "spark.ui.showConsoleProgress": "false"}
        spark_cmd = [submit or "spark-submit", "--master", args.spark_master, "--driver-memory", "2g",
                     *[a for k, v in conf.items() for a in ("--conf", f"{k}={v}")],
                     str(REPO_ROOT / "spark_jobs" / "build_samples.py"), "--day", DAY,
                     "--config", config_path, *set_args]
        for r in range(args.rounds):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            row: dict[str, dict] = {f"{p}/{t}": {} for p, t in configs}
            phases = ("solo", "shared") if r % 2 == 0 else ("shared", "solo")
            for phase in phases:
                spark = SparkLoop(spark_cmd, env) if phase == "shared" else None
                if spark is not None:
                    spark.start(settle=5.0)
                try:
                    for policy, threads in order:
                        cpu0, t0 = (spark.cpu() if spark else 0.0), time.monotonic()
                        res = run_worker(policy, threads, args.seconds, args.shape, args.overrides)
                        if spark is not None:
                            res["spark_cpus_busy"] = round((spark.cpu() - cpu0) / (time.monotonic() - t0), 2)
                        res["load1"] = os.getloadavg()[0]
                        row[f"{policy}/{threads}"][phase] = res
                        print(f"round {r} {phase:>6} {policy:>7} x{threads}: {res['samples_per_s']:9,.0f} samples/s "
                              f"(median step {res['median_step_ms']:7.1f} ms, max {res['max_step_ms']:7.1f} ms"
                              + (f", Spark using {res['spark_cpus_busy']} CPUs" if spark else "")
                              + f", load {res['load1']:.2f})", flush=True)
                finally:
                    if spark is not None:
                        spark.stop()
            results["rounds"].append(row)  # type: ignore[union-attr]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for policy, threads in configs:
        key = f"{policy}/{threads}"
        rows = [row[key] for row in results["rounds"]]  # type: ignore[union-attr]
        solo = [x["solo"]["samples_per_s"] for x in rows]
        shared = [x["shared"]["samples_per_s"] for x in rows]
        summary[key] = {"solo": round(statistics.median(solo)), "shared": round(statistics.median(shared)),
                        "ratio": round(statistics.median(s / o for s, o in zip(shared, solo, strict=True)), 2),
                        "ratios": [round(s / o, 2) for s, o in zip(shared, solo, strict=True)],
                        "spark_cpus_busy": statistics.median(x["shared"]["spark_cpus_busy"] for x in rows)}
    results["summary"] = summary
    results["load_end"] = os.getloadavg()
    print(f"load average at end: {results['load_end']}")
    print("| OMP_WAIT_POLICY | threads | solo samples/s | beside Spark | shared / solo (per round) |")
    for key, s in summary.items():
        policy, threads = key.split("/")
        print(f"| {policy} | {threads} | {s['solo']:,} | {s['shared']:,} | {s['ratio']:.2f} "
              f"({', '.join(f'{v:.2f}' for v in s['ratios'])}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
