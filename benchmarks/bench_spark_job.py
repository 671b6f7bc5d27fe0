"""Benchmark the Spark build job (rows/s, peak memory) against the same hash-and-join in DuckDB.

Why: to know what one day costs on a given machine before sizing ``spark.*`` in the config,
and how much of it is Spark's overhead. Steps, each in its own process so peak memory is
that step's alone (sum of the RSS of the process tree, sampled every 0.1 s):

1. the generator writes N impressions of one day (plus their late clicks/conversions);
2. ``spark-submit --master <master> spark_jobs/build_samples.py --day D``;
3. DuckDB (same thread count) reads the same files, dedupes, applies both windows, hashes
   every configured feature and writes the same sorted Parquet layout. It does no
   quarantine accounting and uses DuckDB's ``hash()`` (not xxhash64), so it is a lower
   bound for the same work, not a replacement.

Usage: ``python benchmarks/bench_spark_job.py --impressions 1000000 [--master local[2]]``; on a
shared machine generate once and measure interleaved rounds as ratios:
``--workdir /tmp/b --reuse --rounds 3 [--format parquet] [--baseline-root /tmp/old-checkout] [--profile]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.config import PipelineConfig, load_config  # noqa: E402
from mmn.tasks import spark_submit_conf  # noqa: E402

DAY = "2026-11-01"


# ---------------------------------------------------------------- measuring


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak tree RSS bytes, combined output) of a command."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit {proc.returncode}:\n{output[-4000:]}")
    return wall, peak, output


# ---------------------------------------------------------------- DuckDB reference


def _json_columns(cfg: PipelineConfig, log: str) -> str:
    types = {"string": "VARCHAR", "timestamp": "VARCHAR"}
    cols = {name: types.get(kind, "DOUBLE") for name, kind in cfg.logs[log].required.items()}
    if log == "impressions":
        for f in cfg.features:
            cols.setdefault(f.name, "VARCHAR" if f.kind == "categorical" else "DOUBLE")
    return "{" + ", ".join(f"'{k}': '{v}'" for k, v in cols.items()) + "}"


def _files(cfg: PipelineConfig, log: str, days: Sequence[str], pattern: str = "*.jsonl*") -> list[str]:
    return [str(p) for d in days for p in sorted(cfg.paths.raw_dir(log, d).glob(pattern))]


def duckdb_sql(cfg: PipelineConfig, day: str, out: Path) -> str:
    """The build job's hash-and-join as one DuckDB statement over the same raw files."""
    from spark_jobs.sources import partition_spans, shift

    click_days, conv_days = partition_spans(cfg)
    imp_id, click_id, conv_id = (cfg.logs[log].id_field for log in ("impressions", "clicks", "conversions"))

    def source(log: str, days: Sequence[str]) -> str:
        parquet = _files(cfg, log, days, "*.parquet")
        if parquet:  # Parquet raw logs (generator --format parquet): typed columns, nothing to parse
            return "read_parquet([" + ", ".join(f"'{f}'" for f in parquet) + "], union_by_name=true)"
        files = ", ".join(f"'{f}'" for f in _files(cfg, log, days))
        return (f"read_json([{files}], format='newline_delimited', columns={_json_columns(cfg, log)}, "
                "ignore_errors=true)")

    features = []
    for f in cfg.features:
        if f.kind == "categorical":
            features.append(f"CASE WHEN {f.name} IS NULL OR {f.name} = '' THEN 0 ELSE "
                            f"1 + (hash('{f.name}=' || {f.name}) % {f.buckets - 1}) END::INTEGER AS {f.column}")
        else:
            buckets = " + ".join(f"({f.name} >= {b})::INTEGER" for b in f.boundaries)
            features.append(f"CASE WHEN {f.name} IS NULL OR isnan({f.name}) THEN 0 ELSE 1 + {buckets} END::INTEGER "
                            f"AS {f.column}")
    window = f"INTERVAL {cfg.windows.click_window_minutes} MINUTE"
    attribution = f"INTERVAL {cfg.windows.attribution_window_hours} HOUR"
    type_f, scen_f = cfg.domains.type_field, cfg.domains.scenario_field
    return f"""
COPY (
  WITH imps AS (
    SELECT * REPLACE (ts::TIMESTAMPTZ AS ts) FROM {source("impressions", [day])}
    QUALIFY row_number() OVER (PARTITION BY {imp_id} ORDER BY ts) = 1),
  clicks AS (
    SELECT * REPLACE (ts::TIMESTAMPTZ AS ts)
    FROM {source("clicks", [shift(day, i) for i in range(click_days + 1)])}
    QUALIFY row_number() OVER (PARTITION BY {click_id} ORDER BY ts) = 1),
  convs AS (
    SELECT * REPLACE (ts::TIMESTAMPTZ AS ts)
    FROM {source("conversions", [shift(day, i) for i in range(conv_days + 1)])}
    QUALIFY row_number() OVER (PARTITION BY {conv_id} ORDER BY ts) = 1),
  counted AS (
    SELECT c.{click_id}, c.{imp_id}, c.ts FROM clicks c JOIN imps i USING ({imp_id})
    WHERE c.ts >= i.ts AND c.ts <= i.ts + {window}
    QUALIFY row_number() OVER (PARTITION BY c.{imp_id} ORDER BY c.ts, c.{click_id}) = 1),
  converted AS (
    SELECT DISTINCT k.{imp_id} FROM convs v JOIN counted k USING ({click_id})
    WHERE v.ts >= k.ts AND v.ts <= k.ts + {attribution}),
  types AS (SELECT {type_f}, (row_number() OVER (ORDER BY {type_f}) - 1)::INTEGER AS type_id
            FROM (SELECT DISTINCT {type_f} FROM imps)),
  scens AS (SELECT {scen_f}, (row_number() OVER (ORDER BY {scen_f}) - 1)::INTEGER AS scenario_id
            FROM (SELECT DISTINCT {scen_f} FROM imps))
  SELECT i.{imp_id}, i.ts, i.{type_f}, i.{scen_f}, t.type_id, s.scenario_id, {", ".join(features)},
         (k.{imp_id} IS NOT NULL)::INTEGER AS click, (v.{imp_id} IS NOT NULL)::INTEGER AS conversion
  FROM imps i JOIN types t USING ({type_f}) JOIN scens s USING ({scen_f})
  LEFT JOIN counted k ON k.{imp_id} = i.{imp_id} LEFT JOIN converted v ON v.{imp_id} = i.{imp_id}
  ORDER BY type_id, scenario_id, i.{imp_id}
) TO '{out}' (FORMAT parquet, PER_THREAD_OUTPUT true)
"""


def run_duckdb(config_path: str, overrides: Sequence[str], day: str, out: str, threads: int) -> None:
    """Entry point of the DuckDB subprocess: prints the statement's wall time and row count."""
    import duckdb

    cfg = load_config(config_path, overrides=overrides)
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute("SET TimeZone = 'UTC'")
    started = time.monotonic()
    con.execute(duckdb_sql(cfg, day, Path(out)))
    seconds = time.monotonic() - started
    rows = con.execute(f"SELECT count(*) FROM read_parquet('{out}/*.parquet')").fetchone()[0]
    print(json.dumps({"duckdb_seconds": seconds, "rows": rows}))


# ---------------------------------------------------------------- driver


def _threads(master: str) -> int:
    found = re.fullmatch(r"local\[(\d+|\*)\]", master)
    if not found or found.group(1) == "*":
        return os.cpu_count() or 1
    return int(found.group(1))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def stage_profile(event_dir: Path, top: int = 12) -> dict[str, object]:
    """Where a run's time went, from Spark's event log (the newest in ``event_dir``): the
    tasks' executor run and CPU seconds in all, and per stage (wall seconds too) the costliest."""
    logs = sorted(event_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    if not logs:
        return {}
    # Spark 4 writes a folder per application (rolling event files) unless told otherwise.
    files = sorted(logs[-1].glob("events_*")) if logs[-1].is_dir() else [logs[-1]]
    stages: dict[int, dict[str, object]] = {}
    for path in files:
        for line in path.open():
            if '"SparkListenerStageCompleted"' not in line and '"SparkListenerTaskEnd"' not in line:
                continue
            event = json.loads(line)
            if event["Event"] == "SparkListenerTaskEnd":
                metrics = event.get("Task Metrics") or {}
                entry = stages.setdefault(event["Stage ID"], {"run_s": 0.0, "cpu_s": 0.0, "tasks": 0})
                entry["run_s"] += metrics.get("Executor Run Time", 0) / 1000
                entry["cpu_s"] += metrics.get("Executor CPU Time", 0) / 1e9
                entry["tasks"] += 1
            else:
                info = event["Stage Info"]
                entry = stages.setdefault(info["Stage ID"], {"run_s": 0.0, "cpu_s": 0.0, "tasks": 0})
                entry["name"] = info["Stage Name"].replace(f"{REPO_ROOT}/", "")
                entry["wall_s"] = (info.get("Completion Time", 0) - info.get("Submission Time", 0)) / 1000
    rows = [{"stage": sid, **{k: round(v, 1) if isinstance(v, float) else v for k, v in e.items()}}
            for sid, e in stages.items()]
    return {"stages": len(rows), "run_s": round(sum(float(r["run_s"]) for r in rows), 1),
            "cpu_s": round(sum(float(r["cpu_s"]) for r in rows), 1),
            "top": sorted(rows, key=lambda r: -float(r["run_s"]))[:top]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impressions", type=int, default=1_000_000)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="4g")
    parser.add_argument("--workdir", help="default: a new temporary folder, removed afterwards")
    parser.add_argument("--reuse", action="store_true",
                        help="with --workdir: keep the raw logs already there (generated once, read many times)")
    parser.add_argument("--format", dest="fmt", choices=("jsonl", "jsonl.gz", "parquet"), default="jsonl",
                        help="the raw logs' format (the generator's --format); the job reads either")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved rounds (Spark, then DuckDB, per round): on a shared machine the "
                             "per-round ratio is steadier than either time alone")
    parser.add_argument("--baseline-root", action="append", default=[], metavar="DIR",
                        help="also run DIR/spark_jobs/build_samples.py in each round (a checkout of another "
                             "commit), for a lever's gain as a ratio measured under the same load")
    parser.add_argument("--profile", action="store_true",
                        help="write Spark's event log under <workdir>/events and print the costliest stages")
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--skip-duckdb", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--duckdb-child", nargs=2, metavar=("DAY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mmn-bench-"))
    overrides = [*args.overrides, f"paths.raw_root={work / 'raw'}", f"paths.lake_root={work / 'lake'}",
                 f"paths.truth_root={work / 'truth'}", f"spark.master={args.master}"]
    config_path = args.config or str(load_config().source)
    if args.duckdb_child:
        run_duckdb(config_path, overrides, args.duckdb_child[0], args.duckdb_child[1], _threads(args.master))
        return 0

    set_args = [a for o in overrides for a in ("--set", o)]
    cfg = load_config(config_path, overrides=overrides)  # the job's own config, as it will read it
    py = sys.executable
    env = {**os.environ, "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", py),
           "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"), "PYTHONPATH": str(REPO_ROOT)}
    results: dict[str, object] = {"impressions": args.impressions, "master": args.master, "format": args.fmt}
    jobs = {"spark": REPO_ROOT, **{f"baseline{i}": Path(d).resolve() for i, d in enumerate(args.baseline_root)}}
    try:
        if not (args.reuse and (work / "raw").is_dir()):
            gen_s, gen_peak, _ = run_measured([py, "-m", "simulation.generate_logs", "--start", DAY, "--days", "1",
                                               "--impressions-per-day", str(args.impressions), "--format", args.fmt,
                                               "--config", config_path, *set_args], env)
            results["generator"] = {"seconds": round(gen_s, 2), "rows_per_s": round(args.impressions / gen_s),
                                    "peak_rss_mb": round(gen_peak / 2**20)}
        results["raw_mb"] = round(sum(p.stat().st_size for p in (work / "raw").rglob("*") if p.is_file()) / 2**20)

        submit = shutil.which("spark-submit", path=f"{Path(py).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        conf = {**spark_submit_conf(cfg),
                "spark.ui.showConsoleProgress": "false"}  # the CLI's and the DAG's settings
        if args.profile:
            (work / "events").mkdir(parents=True, exist_ok=True)
            conf |= {"spark.eventLog.enabled": "true", "spark.eventLog.dir": str(work / "events"),
                     "spark.eventLog.compress": "false"}
        rounds: list[dict[str, object]] = []
        for n in range(args.rounds):
            entry: dict[str, object] = {"round": n + 1, "load_avg_1m": round(os.getloadavg()[0], 2)}
            for name, root in jobs.items():
                spark_s, spark_peak, out = run_measured(
                    [submit or "spark-submit", "--master", args.master, "--driver-memory", args.driver_memory,
                     *[a for key, value in conf.items() for a in ("--conf", f"{key}={value}")],
                     str(root / "spark_jobs" / "build_samples.py"),
                     "--day", DAY, "--config", config_path, *set_args], {**env, "PYTHONPATH": str(root)})
                job = re.search(r"in ([0-9.]+)s\n", out)
                job_s = float(job.group(1)) if job else spark_s
                phases = re.search(r"phases: (.*)\n", out)
                manifest = json.loads(cfg.paths.manifest_path(DAY).read_text())
                entry[name] = {"wall_seconds": round(spark_s, 2), "job_seconds": round(job_s, 2),
                               "rows_per_s": round(args.impressions / job_s),
                               "rows_per_s_incl_startup": round(args.impressions / spark_s),
                               "peak_rss_mb": round(spark_peak / 2**20), "samples": manifest["outputs"]["samples"],
                               "phases": phases.group(1) if phases else ""}
                if args.profile:
                    entry[name]["profile"] = stage_profile(work / "events")
            if not args.skip_duckdb:
                shutil.rmtree(work / "duckdb", ignore_errors=True)  # a rerun in the same --workdir
                duck_s, duck_peak, out = run_measured([py, __file__, "--duckdb-child", DAY, str(work / "duckdb"),
                                                       "--config", config_path, "--master", args.master,
                                                       *[a for o in args.overrides for a in ("--set", o)],
                                                       "--workdir", str(work)], env)
                duck = json.loads(out.strip().splitlines()[-1])
                entry["duckdb"] = {"wall_seconds": round(duck_s, 2), "query_seconds": round(duck["duckdb_seconds"], 2),
                                   "rows_per_s": round(args.impressions / duck["duckdb_seconds"]),
                                   "peak_rss_mb": round(duck_peak / 2**20), "samples": duck["rows"]}
                for name in jobs:
                    entry[f"{name}_to_duckdb"] = round(entry[name]["job_seconds"] / duck["duckdb_seconds"], 2)
            for name in jobs:
                if name != "spark":
                    entry[f"spark_to_{name}"] = round(entry["spark"]["job_seconds"] / entry[name]["job_seconds"], 3)
            entry["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
            print(json.dumps(entry), flush=True)
            rounds.append(entry)
        results["rounds"] = rounds
        ratios = [k for k in rounds[0] if k.endswith("_to_duckdb") or k.startswith("spark_to_")]
        results["median"] = {k: _median([float(r[k]) for r in rounds]) for k in ratios}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
