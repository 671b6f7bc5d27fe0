"""Time the GX validation of one built day with each engine (pandas, Spark), and its peak memory.

Why: the issue asks which engine is faster on a 10M-row partition as the Spark job writes
it. Point it at a lake a real build wrote (e.g. the workdir of bench_spark_job.py):

    PYTHONPATH=. python benchmarks/bench_spark_job.py --impressions 10000000 --workdir /tmp/bench/spark10m
    PYTHONPATH=. python benchmarks/bench_validation.py --workdir /tmp/bench/spark10m --engines pandas,spark

Each engine runs in its own process, so the peak RSS is that run's alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.config import load_config  # noqa: E402

DAY = "2026-11-01"


def overrides_for(workdir: Path) -> list[str]:
    return [f"paths.raw_root={workdir / 'raw'}", f"paths.lake_root={workdir / 'lake'}",
            f"paths.truth_root={workdir / 'truth'}", f"paths.reports_root={workdir / 'reports'}"]


def run_one(workdir: Path, day: str, engine: str) -> dict:
    """In this process: validate and report seconds, rows, outcome and peak RSS."""
    from validation.runner import validate_day

    cfg = load_config(overrides=overrides_for(workdir))
    start = time.perf_counter()
    report = validate_day(cfg, day, engine=engine)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"engine": engine, "seconds": seconds, "rows": getattr(report, "n_rows", None),
            "success": bool(report.success), "peak_rss_gb": peak_kb / 1024 ** 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--day", default=DAY)
    parser.add_argument("--engines", default="pandas,spark")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.workdir, args.day, args.child)))
        return
    results = []
    for engine in args.engines.split(","):
        proc = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--day", args.day,
                               "--child", engine], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{engine}: validation run failed")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{engine:<7} {result['rows'] or 0:>12,} rows  {result['seconds']:7.1f} s  "
              f"peak RSS {result['peak_rss_gb']:.2f} GB  success={result['success']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
