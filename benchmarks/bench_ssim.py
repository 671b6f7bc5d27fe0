"""Does SSIM help data-poor scenarios? MMN vs MMN+SSIM and DNN vs DNN+SSIM on synthetic days.

Data: simulation/synthetic.py days (CVR depends on a per-(type, scenario) interaction) where
the training days keep only ``--poor-keep`` of the rows of the ``--poor`` scenarios; the
test day is complete, so every domain's holdout CVR AUC is measurable. Per seed and kind:

* baseline: ``train()`` without SSIM (its wall time is "one training run");
* SSIM: ``search()`` with that kind as backbone (timed), then one training per ratio of
  ``--grid`` (ratio 0 is the baseline itself), the ratio chosen on the trainer's validation
  slice by ``ssim.ratio_metric`` (choose_ratio's rule); the chosen model is scored on the test day.

Reported: holdout CVR AUC averaged over domains, over the poor / rich domains, and per
domain (mean ± std over seeds); the holdout AUC at every ratio; the chosen ratios; search
time / one training run. ``--random-control`` also trains each ratio with the same number
of shared pairs per target domain picked at random (is the learned selection better than
sharing at random?).

    .venv/bin/python benchmarks/bench_ssim.py [--rows-per-day 20000] [--seeds 1,2,3]
        [--kinds mmn,dnn] [--poor 2,3] [--poor-keep 0.1] [--random-control] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from core.config import PipelineConfig, load_config
from simulation.synthetic import make_day, scenario_names, type_names, write_day, write_vocabs
from training import ssim as S
from training.metrics import evaluate
from training.options import TrainOptions
from training.trainer import slice_ranges, train

SMALL_FEATURES = [
    {"name": "user_id", "kind": "categorical", "buckets": 2000},
    {"name": "ad_id", "kind": "categorical", "buckets": 500},
    {"name": "ad_category", "kind": "categorical", "buckets": 50},
    {"name": "device_os", "kind": "categorical", "buckets": 16},
    {"name": "user_age", "kind": "numeric", "boundaries": [18, 25, 35, 45, 55, 65]},
]


def bench_config(root: Path, args: argparse.Namespace) -> PipelineConfig:
    return load_config(overrides={
        "paths.lake_root": str(root / "lake"), "paths.truth_root": str(root / "truth"),
        "paths.reports_root": str(root / "reports"), "features": SMALL_FEATURES,
        "model.embedding_dim": 8, "model.ctr_hidden": [32], "model.cvr_hidden": [32, 16],
        "training.batch_size": args.batch_size, "training.epochs": args.epochs,
        "training.shuffle_buffer": 20000, "training.read_batch_rows": 4096,
        "training.eval_every_steps": 100, "training.validation_fraction": 0.1,
        "training.early_stopping_patience": 3,
    })


def drop_rows(table: pa.Table, scenarios: Sequence[int], keep: float, day: str) -> pa.Table:
    """Keep a ``keep`` fraction of the rows of ``scenarios`` (deterministic per day)."""
    rng = np.random.default_rng(zlib.crc32(day.encode()))
    poor = np.isin(table.column("scenario_id").to_numpy(), list(scenarios))
    return table.filter(pa.array(~poor | (rng.random(table.num_rows) < keep)))


def write_data(cfg: PipelineConfig, args: argparse.Namespace) -> tuple[list[str], str]:
    days = [f"2024-05-{d:02d}" for d in range(1, args.train_days + 2)]
    for day in days:
        samples, truth = make_day(cfg, day, args.rows_per_day, args.types, args.scenarios, seed=7)
        if day != days[-1]:
            samples = drop_rows(samples, args.poor, args.poor_keep, day)
        write_day(cfg, day, samples, truth)
    write_vocabs(cfg, args.types, args.scenarios)
    return days[:-1], days[-1]


def timed(fn: Any, *a: Any, **k: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - start


def holdout(cfg: PipelineConfig, model: torch.nn.Module, day: str, args: argparse.Namespace,
            ) -> dict[str, float | None]:
    return evaluate(model, cfg, [day], vocab_types=type_names(args.types),
                    vocab_scenarios=scenario_names(args.scenarios))


def domain_keys(args: argparse.Namespace) -> list[tuple[str, bool]]:
    """(holdout metric key, is the domain data-poor) of every domain."""
    return [(f"cvr_auc_domain/{t}/{scenario_names(args.scenarios)[s]}", s in args.poor)
            for t in type_names(args.types) for s in range(args.scenarios)]


def summarize(metrics: dict[str, float | None], args: argparse.Namespace) -> dict[str, float]:
    """Domain-average, poor / rich averages and per-domain CVR AUC (NaN where undefined)."""
    keys = domain_keys(args)
    per = {k: float("nan") if metrics.get(k) is None else float(metrics[k]) for k, _ in keys}
    out = {"domain_avg": float(np.nanmean(list(per.values()))),
           "poor_avg": float(np.nanmean([per[k] for k, poor in keys if poor])),
           "rich_avg": float(np.nanmean([per[k] for k, poor in keys if not poor]))}
    out.update({k.removeprefix("cvr_auc_domain/"): v for k, v in per.items()})
    return out


def run_kind(cfg: PipelineConfig, kind: str, train_days: list[str], test_day: str,
             args: argparse.Namespace) -> dict[str, Any]:
    """Baseline and SSIM for one kind and seed (cfg.training.seed)."""
    options = TrainOptions(model_kind=kind, progress=False)
    base, train_s = timed(train, cfg, train_days, options)
    shared, search_s = timed(S.search, cfg, train_days, model_kind=kind)
    validation = slice_ranges(cfg, train_days, None, None, 200_000).validation
    metric = cfg.ssim.ratio_metric
    runs = [S.RatioRun(0.0, base, S.slice_metrics(cfg, base.model, train_days, validation,
                                                  args.types, args.scenarios))]
    runs += S.ratio_sweep(cfg, train_days, shared, [r for r in args.grid if r > 0], options)
    ratio = S.best_ratio(runs, metric)
    by_ratio = {r.ratio: summarize(holdout(cfg, r.result.model, test_day, args), args) for r in runs}
    out = {"kind": kind, "train_seconds": train_s, "search_seconds": search_s,
           "selection_ratio": shared.manifest["selection_ratio"], "chosen_ratio": ratio,
           "validation": {r.ratio: r.metrics.get(metric) for r in runs},
           "baseline": by_ratio[0.0], "ssim": by_ratio[ratio], "by_ratio": by_ratio}
    if args.random_control:
        out["random_by_ratio"] = random_control(cfg, kind, shared, train_days, test_day, args)
    return out


def random_control(cfg: PipelineConfig, kind: str, shared: S.SharedSet, train_days: list[str],
                   test_day: str, args: argparse.Namespace) -> dict[float, dict[str, float]]:
    """Holdout metrics when each ratio's pairs are drawn at random instead of by score."""
    rng = np.random.default_rng(cfg.training.seed)
    scores = rng.random(len(shared.pairs)).astype(np.float32)
    randomized = dataclasses.replace(shared, pairs=shared.pairs.assign(score=scores))
    runs = S.ratio_sweep(cfg, train_days, randomized, [r for r in args.grid if r > 0],
                         TrainOptions(model_kind=kind, progress=False))
    return {r.ratio: summarize(holdout(cfg, r.result.model, test_day, args), args) for r in runs}


def _cell(values: Sequence[float]) -> str:
    arr = np.asarray([v for v in values if not math.isnan(v)])
    if arr.size == 0:
        return "n/a"
    return f"{arr.mean():.4f}" + (f" ± {arr.std(ddof=1):.4f}" if arr.size > 1 else "")


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Markdown: one row per model (+SSIM), mean ± std over seeds."""
    columns = ["domain_avg", "poor_avg", "rich_avg",
               *(k.removeprefix("cvr_auc_domain/") for k, _ in domain_keys(args))]
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for kind in args.kinds:
        mine = [r for r in results if r["kind"] == kind]
        for label, key in ((kind, "baseline"), (f"{kind}+ssim", "ssim")):
            cells = [_cell([r[key][c] for r in mine]) for c in columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for kind in args.kinds:
        mine = [r for r in results if r["kind"] == kind]
        ratio = [r["search_seconds"] / r["train_seconds"] for r in mine]
        lines.append(f"- {kind}: chosen ratios {[r['chosen_ratio'] for r in mine]}, search selection "
                     f"ratio {_cell([r['selection_ratio'] for r in mine])}, search time / one "
                     f"training run {_cell(ratio)} (train {_cell([r['train_seconds'] for r in mine])} s)")
        for g in args.grid:
            line = (f"  - ratio {g}: holdout domain_avg "
                    f"{_cell([r['by_ratio'][g]['domain_avg'] for r in mine])}, poor_avg "
                    f"{_cell([r['by_ratio'][g]['poor_avg'] for r in mine])}")
            if g > 0 and all("random_by_ratio" in r for r in mine):
                line += (f"; random pairs: domain_avg "
                         f"{_cell([r['random_by_ratio'][g]['domain_avg'] for r in mine])}, poor_avg "
                         f"{_cell([r['random_by_ratio'][g]['poor_avg'] for r in mine])}")
            lines.append(line)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows-per-day", type=int, default=20000)
    p.add_argument("--train-days", type=int, default=3)
    p.add_argument("--types", type=int, default=2)
    p.add_argument("--scenarios", type=int, default=4)
    p.add_argument("--poor", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3])
    p.add_argument("--poor-keep", type=float, default=0.1)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    p.add_argument("--kinds", type=lambda s: s.split(","), default=["mmn", "dnn"])
    p.add_argument("--grid", type=lambda s: [float(x) for x in s.split(",")],
                   default=list(load_config().ssim.ratio_grid))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--random-control", action="store_true",
                   help="also train every ratio with randomly chosen pairs")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if 0.0 not in args.grid:
        args.grid = [0.0, *args.grid]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-ssim-") as tmp:
        cfg = bench_config(Path(tmp), args)
        train_days, test_day = write_data(cfg, args)
        results = []
        for seed in args.seeds:
            seeded = cfg.with_overrides({"training.seed": seed})
            for kind in args.kinds:
                results.append({"seed": seed, **run_kind(seeded, kind, train_days, test_day, args)})
                r = results[-1]
                print(f"seed {seed} {kind}: baseline {r['baseline']['domain_avg']:.4f} "
                      f"ssim {r['ssim']['domain_avg']:.4f} (ratio {r['chosen_ratio']}) "
                      f"search/train {r['search_seconds'] / r['train_seconds']:.2f}", flush=True)
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
