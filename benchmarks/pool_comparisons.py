"""Pool the seeds of several comparisons of one preset into one table (mean ± std).

A long study can run its seeds in separate sittings (``bench_accuracy.py --seeds 1`` today,
``--seeds 2,3`` tomorrow): each sitting is its own comparison, whose per-seed holdout
metrics :func:`mmn.compare.compare` saved as ``comparison.json`` in the preset's
reports folder. This reads those files, checks that they scored the same holdout day and
do not repeat a (model, seed), and builds the paper-shaped table with the same code as
``compare`` (:func:`mmn.compare.comparison_table`), plus the averages summary with
each model's gap to the oracle and how often it was the best model per seed.

    PYTHONPATH=. python benchmarks/pool_comparisons.py --out /tmp/bench/accuracy \\
        --preset criteo --ids 0c993101c14b,1a2b3c4d5e6f --json /tmp/bench/pooled_criteo.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.bench_accuracy import AVERAGES, preset_env
from core.config import load_config
from mmn.compare import ORACLE_ROW, comparison_table, mean_std, to_markdown

Metrics = dict[str, dict[int, dict[str, Any]]]


def load_comparison(reports_root: Path, comparison_id: str) -> dict[str, Any]:
    """The ``comparison.json`` one comparison wrote (``<day>_<id>`` folder)."""
    found = sorted((reports_root / "comparisons").glob(f"*_{comparison_id}/comparison.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"comparison {comparison_id!r}: expected one comparison.json under "
                                f"{reports_root / 'comparisons'}, found {len(found)}")
    return json.loads(found[0].read_text())


def pool_metrics(comparisons: list[dict[str, Any]]) -> tuple[str, Metrics]:
    """kind -> seed -> holdout metrics over all comparisons; refuses mixed days or repeats."""
    days = {c["day"] for c in comparisons}
    if len(days) != 1:
        raise ValueError(f"the comparisons scored different holdout days {sorted(days)}")
    pooled: Metrics = {}
    for comparison in comparisons:
        for kind, per_seed in comparison["metrics"].items():
            for seed, metrics in per_seed.items():
                if int(seed) in pooled.setdefault(kind, {}):
                    raise ValueError(f"{kind} seed {seed} is in more than one comparison")
                pooled[kind][int(seed)] = metrics
    return days.pop(), pooled


def best_counts(pooled: Metrics, column_key: str) -> dict[str, int]:
    """Per kind: on how many seeds it had the highest value of ``column_key``."""
    seeds = sorted({s for per_seed in pooled.values() for s in per_seed})
    wins = dict.fromkeys(pooled, 0)
    for seed in seeds:
        scored = {k: per_seed[seed].get(column_key) for k, per_seed in pooled.items() if seed in per_seed}
        scored = {k: v for k, v in scored.items() if v is not None}
        if scored:
            wins[max(scored, key=scored.get)] += 1
    return wins


def well_observed_domain_avg(metrics: dict[str, Any], min_conversions: int, prefix: str = "") -> float:
    """Mean CVR AUC over the domains with at least ``min_conversions`` holdout conversions.

    A domain's AUC from one or two conversions is the rank of those rows alone; the plain
    per-domain average weighs such domains like any other, so it is mostly holdout noise
    when conversions are scarce. This average keeps the domains where AUC means something."""
    values = []
    for key, value in metrics.items():
        if key.startswith(f"{prefix}cvr_auc_domain/") and value is not None:
            domain = key.split("cvr_auc_domain/", 1)[1]
            if (metrics.get(f"n_conversions_domain/{domain}") or 0) >= min_conversions:
                values.append(value)
    return float(sum(values) / len(values)) if values else math.nan


def summarize(pooled: Metrics, table: pd.DataFrame, min_conversions: int) -> dict[str, dict[str, float]]:
    """Per kind: the four averages' mean and std, gaps to the oracle, per-domain wins, and
    the per-domain average over well-observed domains. ``table``: ``comparison_table(pooled, ...)``."""
    wins = best_counts(pooled, "cvr_auc_domain_avg")
    summary: dict[str, dict[str, float]] = {}
    for kind, row in table.iterrows():
        out = {}
        for column in AVERAGES:
            out[column] = float(row[column])
            out[f"{column}_std"] = float(row.get(f"{column}_std", math.nan))
            if kind != ORACLE_ROW and ORACLE_ROW in table.index:
                out[f"{column}_gap_to_oracle"] = float(table.loc[ORACLE_ROW, column] - row[column])
        if kind in pooled:
            out["seeds"] = len(pooled[kind])
            out["best_domain_avg_on_seeds"] = wins[kind]
            per_seed = [well_observed_domain_avg(m, min_conversions) for m in pooled[kind].values()]
        else:  # the oracle: the same rows in every run, so any run's metrics will do
            first = next(m for per_seed in pooled.values() for m in per_seed.values())
            per_seed = [well_observed_domain_avg(first, min_conversions, prefix="oracle_")]
        mean, std = mean_std(per_seed)
        out["well_observed_domain_avg"], out["well_observed_domain_avg_std"] = mean, std
        summary[str(kind)] = out
    return summary


def _cell(row: dict[str, float], column: str, bold: bool) -> str:
    mean, std = row[column], row[f"{column}_std"]
    text = f"{mean:.4f}" + ("" if math.isnan(std) else f" ± {std:.4f}")
    return f"**{text}**" if bold else text


def summary_markdown(summary: dict[str, dict[str, float]], min_conversions: int) -> str:
    """The averages as a Markdown table; the best model per column in bold."""
    models = {k: v for k, v in summary.items() if k != ORACLE_ROW}
    columns = [*AVERAGES, "well_observed_domain_avg"]
    best = {c: max(v[c] for v in models.values() if not math.isnan(v[c])) for c in columns}
    lines = ["| model | per-type avg | per-scenario avg | per-domain avg | overall "
             f"| per-domain avg, domains with ≥ {min_conversions} conversions "
             "| gap to oracle (per-domain) | best per-domain on seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, row in summary.items():
        cells = [_cell(row, c, kind in models and row[c] == best[c]) for c in columns]
        gap = row.get("domain_avg_gap_to_oracle")
        wins = row.get("best_domain_avg_on_seeds")
        name = f"`{kind}`" if kind in models else f"*{kind}*"
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {'' if gap is None else f'{gap:.3f}'} | {'' if wins is None else wins} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench/accuracy", help="bench_accuracy.py's --out")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--ids", required=True, help="comma-separated comparison ids")
    parser.add_argument("--impressions", type=int, default=150000)
    parser.add_argument("--min-conversions", type=int, default=5,
                        help="holdout conversions a domain needs to count as well observed")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = Path(args.out) / args.preset
    os.environ.update(preset_env(root, args.preset, args.impressions))
    cfg = load_config()
    from mmn.tasks import vocab_lists

    types, scenarios = vocab_lists(cfg)
    ids = args.ids.split(",")
    day, pooled = pool_metrics([load_comparison(cfg.paths.reports_root, i) for i in ids])
    table = comparison_table(pooled, types, scenarios)
    seeds = sorted({s for per_seed in pooled.values() for s in per_seed})
    caption = (f"Holdout CVR AUC of {day} ({args.preset}), mean ± std over seeds {seeds}, "
               f"pooled from comparisons {', '.join(f'`{i}`' for i in ids)}.")
    summary = summarize(pooled, table, args.min_conversions)
    print(summary_markdown(summary, args.min_conversions))
    print(to_markdown(table, types, scenarios, caption))
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "day": day, "ids": ids,
                                               "seeds": seeds, "min_conversions": args.min_conversions,
                                               "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
