"""The daily DAG at production volume: one impression day end to end, per task.

A running pipeline has already built the days of its training window; the day's DAG run then
builds the new day, validates it, trains on the window, scores the holdout and gates. This
script reproduces that state and times that run:

1. generate ``--window + 1`` days of raw logs at ``--impressions`` a day (the generator);
2. build the window's days with the Spark job (spark-submit; timed, not part of the run);
3. run the daily DAG for the last day through Airflow (``dag.test()`` on a scratch SQLite
   metadata DB, exactly as ``make demo`` runs a day), and print each task's seconds.

Everything lives under ``--out`` (lake, MLflow store, AIRFLOW_HOME), so the project's own
.airflow and data are never touched. The console gets the per-task table; the full log (Spark,
training) goes to a file under ``--out``.

    PYTHONPATH=. python benchmarks/bench_daily_dag.py --impressions 1000000 --out /tmp/bench/dag1m \\
        --json /tmp/bench/dag1m.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.bench_accuracy import preset_env, study_days


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=1_000_000)
    parser.add_argument("--window", type=int, default=3, help="training window days (built beforehand)")
    parser.add_argument("--start", default="2026-11-01")
    parser.add_argument("--preset", default="criteo")
    parser.add_argument("--out", default="/tmp/bench/dag")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.update(preset_env(root, args.preset, args.impressions))
    os.environ["AIRFLOW_HOME"] = str(root / "airflow")
    from core.config import load_config
    from mmn.airflow_env import apply
    from mmn.demo import Console, load_dag, migrate_airflow_db, run_day
    from mmn.tasks import build_day
    from simulation.generate_logs import generate

    cfg = load_config(overrides=[f"windows.train_window_days={args.window}", *args.set])
    apply(cfg)
    days = study_days(args.start, args.window + 1)
    console = Console(root / "bench_daily_dag.log")
    console.say(f"{args.impressions:,} impressions a day, window {args.window} days, full log {console.log_path}; "
                f"load average at start {os.getloadavg()[0]:.2f}")
    phases: dict[str, float] = {}
    with console.capture():
        began = time.monotonic()
        if not all(cfg.paths.manifest_path(d).exists() for d in days[:-1]):
            generate(cfg, days[0], len(days))
            phases["generate (all days)"] = time.monotonic() - began
            for day in days[:-1]:
                began = time.monotonic()
                build_day(cfg, day)
                phases[f"prebuild window day {day}"] = time.monotonic() - began
                console.say(f"  prebuilt {day} in {phases[f'prebuild window day {day}']:.1f} s")
        migrate_airflow_db()
        dag = load_dag()
        began = time.monotonic()
        result = run_day(cfg, dag, days[-1], console)
        total = time.monotonic() - began
    console.say(f"\nDAG run for {days[-1]}: {result.state} in {total:.1f} s "
                f"(load average {os.getloadavg()[0]:.2f})")
    for task, state, seconds in result.tasks:
        console.say(f"  {task:<20} {state:<10} {seconds:8.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "impressions_per_day": args.impressions, "window_days": args.window, "day": days[-1],
            "state": result.state, "dag_run_seconds": total, "setup_phases_seconds": phases,
            "tasks": [{"task": t, "state": s, "seconds": sec} for t, s, sec in result.tasks],
        }, indent=1))


if __name__ == "__main__":
    main()
