"""Accuracy study: MMN vs baselines vs the oracle on generated data, per preset, over seeds.

For each generator preset, in its own scratch lake and MLflow store: generate
``--train-days + 1`` days of raw logs, build every day with the real Spark job
(spark-submit), then run :func:`mmn.compare.compare` (the same code as
`mmn compare` and the comparison DAG) with the last day as holdout. Prints each preset's
paper-style table (with the oracle row: the generator's true probabilities on the same
rows) and a summary of average per-type / per-scenario / per-domain CVR AUC, mean ± std
over seeds, each model's gap to the oracle, and its training samples/s.

    PYTHONPATH=. python benchmarks/bench_accuracy.py --presets newsfeed,criteo \\
        --kinds mmn,dnn --seeds 1,2,3 --impressions 150000 --out /tmp/bench/accuracy
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.config import load_config

AVERAGES = ("type_avg", "scenario_avg", "domain_avg", "observed_domain_avg", "overall")


def preset_env(root: Path, preset: str, impressions: int) -> dict[str, str]:
    return {
        "MMN__PATHS__RAW_ROOT": str(root / "raw"), "MMN__PATHS__LAKE_ROOT": str(root / "lake"),
        "MMN__PATHS__TRUTH_ROOT": str(root / "truth"), "MMN__PATHS__REPORTS_ROOT": str(root / "reports"),
        "MMN__MLFLOW__TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MMN__MLFLOW__ARTIFACT_ROOT": str(root / "artifacts"),
        "MMN__GENERATOR__PRESET": preset, "MMN__GENERATOR__IMPRESSIONS_PER_DAY": str(impressions),
    }


def study_days(start: str, n: int) -> list[str]:
    first = dt.date.fromisoformat(start)
    return [(first + dt.timedelta(days=i)).isoformat() for i in range(n)]


def prepare_days(root: Path, preset: str, impressions: int, days: list[str], data_seed: int,
                 overrides: list[str]) -> Any:
    """Point the process (and spark-submit, which inherits the environment) at a scratch
    lake and MLflow store under ``root``; generate and build ``days`` unless already built.
    Returns the study's config."""
    from mmn.tasks import build_day
    from simulation.generate_logs import generate

    root.mkdir(parents=True, exist_ok=True)
    os.environ.update(preset_env(root, preset, impressions))
    cfg = load_config(overrides=overrides)
    missing = [d for d in days if not cfg.paths.manifest_path(d).exists()]
    if missing:
        generate(cfg, days[0], len(days), seed=data_seed)
        for day in missing:
            build_day(cfg, day)
    return cfg


def run_preset(preset: str, args: argparse.Namespace) -> dict:
    from mmn.compare import compare

    root = Path(args.out) / preset
    days = study_days(args.start, args.train_days + 1)
    began = time.monotonic()
    cfg = prepare_days(root, preset, args.impressions, days, args.data_seed,
                       [f"windows.train_window_days={args.train_days}", *args.set])
    data_s = time.monotonic() - began
    began = time.monotonic()
    result = compare(cfg, days[-1], args.kinds.split(","), seeds=args.seeds,
                     experiment=f"accuracy_{preset}")
    compare_s = time.monotonic() - began
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.mlflow.tracking_uri)
    speed = {kind: [client.get_run(rid).data.metrics.get("train/samples_per_sec", math.nan)
                    for rid in per_seed.values()] for kind, per_seed in result.child_runs.items()}
    table = result.table
    summary = {}
    for kind in [*result.kinds, "oracle"]:
        if kind not in table.index:
            continue
        row = {}
        for column in AVERAGES:
            row[column] = float(table.loc[kind, column])
            row[f"{column}_std"] = float(table.loc[kind].get(f"{column}_std", math.nan))
            if "oracle" in table.index and kind != "oracle":
                row[f"{column}_gap_to_oracle"] = float(table.loc["oracle", column] - table.loc[kind, column])
        if kind in speed:
            row["train_samples_per_s"] = float(np.nanmean(speed[kind]))
        for name, iv in result.intervals.get(kind, {}).items():
            row[f"{name}_ci"] = [iv.low, iv.high]
            if name.endswith("_vs_ref"):
                row[name] = iv.estimate
        summary[kind] = row
    (root / "comparison.md").write_text(result.markdown)
    return {"preset": preset, "days": days, "holdout": days[-1], "impressions_per_day": args.impressions,
            "reference": result.reference,
            "seeds": args.seeds, "data_seconds": data_s, "compare_seconds": compare_s,
            "summary": summary, "comparison_id": result.comparison_id, "markdown": result.markdown}


def print_summary(res: dict) -> None:
    print(f"\n=== {res['preset']}: {res['impressions_per_day']:,} impressions/day, train on {res['days'][:-1]}, "
          f"holdout {res['holdout']}, seeds {res['seeds']} (data {res['data_seconds']:.0f} s, "
          f"training + evaluation {res['compare_seconds']:.0f} s)")
    print(f"{'model':<22}" + "".join(f"{c:>22}" for c in AVERAGES) + f"{'gap to oracle (type)':>22}{'samples/s':>12}")
    for kind, row in res["summary"].items():
        cells = []
        for c in AVERAGES:
            std = row.get(f"{c}_std", math.nan)
            cells.append(f"{row[c]:.4f}" + ("" if math.isnan(std) else f" ± {std:.4f}"))
        gap = row.get("type_avg_gap_to_oracle")
        speed = row.get("train_samples_per_s")
        print(f"{kind:<22}" + "".join(f"{c:>22}" for c in cells)
              + f"{'' if gap is None else f'{gap:+.4f}':>22}{'' if speed is None else f'{speed:,.0f}':>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="newsfeed,criteo")
    parser.add_argument("--kinds", default="mmn,dnn")
    parser.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2, 3])
    parser.add_argument("--impressions", type=int, default=150000, help="impressions per day")
    parser.add_argument("--train-days", type=int, default=3)
    parser.add_argument("--start", default="2026-11-01")
    parser.add_argument("--data-seed", type=int, default=7)
    parser.add_argument("--out", default="/tmp/bench/accuracy")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    for preset in args.presets.split(","):
        res = run_preset(preset, args)
        print_summary(res)
        print(res["markdown"])
        results.append(res)
        if args.json:  # after each preset, so a long study keeps what it finished
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
