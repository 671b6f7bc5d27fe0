"""Compare MMN with baselines on one day, the way the MMN paper's Tables 2 and 3 do.

Every (kind, seed) is trained and evaluated by the daily pipeline's own steps
(:func:`mmn.tasks.train_day`, :func:`mmn.tasks.evaluate_day`), as child runs of one parent
run in one MLflow experiment (default ``<cfg.mlflow.experiment>_comparison``), tagged with
the comparison id. The parent run gets the comparison table -- rows: models; columns:
holdout CVR AUC per conversion type, per display scenario, and their averages, as
``mean ± std`` over seeds when there are several -- as Markdown and CSV, the raw
per-seed metrics as JSON, and a heatmap of MMN's CVR AUC gain over DNN per
type x scenario when both were trained.

CLI: ``python -m mmn.compare --day D --kinds mmn,dnn,star [--seeds 1,2,3]
[--experiment NAME] [--config PATH] [--set section.key=value ...]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.config import PipelineConfig, add_config_arguments, load_config
from core.contracts import OBSERVED_AVG
from mmn import peer_runs
from mmn.model_kinds import COMPARISON_KINDS, PEER_KINDS

log = logging.getLogger(__name__)

ARTIFACT_DIR = "comparison"
GAIN_BASE, GAIN_MODEL = "dnn", "mmn"  # the heatmap: MMN's gain over the DNN baseline
PARAM_COLUMNS = ("n_params", "n_domain_param_sets")
ORACLE_ROW = "oracle"  # the generator's true probabilities on the same rows
SUMMARY_COLUMNS = ("type_avg", "scenario_avg", "domain_avg", "observed_domain_avg", "overall")
# Columns kept from each model's holdout predictions for the bootstrap (clicked rows only).
BOOTSTRAP_COLUMNS = ("type_id", "scenario_id", "click", "conversion", "p_cvr", "oracle_p_conversion")


@dataclass
class ComparisonResult:
    """What a comparison produced: run ids, per-seed holdout metrics, the table and files."""

    comparison_id: str
    day: str
    experiment_id: str
    parent_run_id: str
    kinds: list[str]
    seeds: list[int]
    child_runs: dict[str, dict[int, str]]  # kind -> seed -> MLflow run id
    metrics: dict[str, dict[int, dict[str, float | None]]]  # kind -> seed -> holdout metrics
    table: pd.DataFrame  # one row per kind: mean columns, plus <column>_std with > 1 seed
    markdown: str
    files: dict[str, Path] = field(default_factory=dict)
    reference: str | None = None  # the model every paired difference is taken against
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> average -> Interval


# ----------------------------------------------------------------------------- table


def auc_columns(types: Sequence[str], scenarios: Sequence[str]) -> list[tuple[str, str]]:
    """(table column, holdout metric key) pairs, in the papers' order."""
    cols = [(f"type/{t}", f"cvr_auc_type/{t}") for t in types]
    cols.append(("type_avg", "cvr_auc_type_avg"))
    cols += [(f"scenario/{s}", f"cvr_auc_scenario/{s}") for s in scenarios]
    cols.append(("scenario_avg", "cvr_auc_scenario_avg"))
    cols += [("domain_avg", "cvr_auc_domain_avg"), ("observed_domain_avg", OBSERVED_AVG),
             ("overall", "cvr_auc")]
    return cols


def _value(metrics: dict[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float("nan") if value is None else float(value)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std over the defined values (NaN when none / fewer than two)."""
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else float("nan")


def comparison_table(metrics: dict[str, dict[int, dict[str, Any]]], types: Sequence[str],
                     scenarios: Sequence[str]) -> pd.DataFrame:
    """One row per model (index: kind); with several seeds each column gets a ``_std``."""
    multi = max(len(per_seed) for per_seed in metrics.values()) > 1
    rows = {}
    for kind, per_seed in metrics.items():
        row: dict[str, float] = {}
        for column, key in [*auc_columns(types, scenarios), *((c, c) for c in PARAM_COLUMNS)]:
            mean, std = mean_std([_value(m, key) for m in per_seed.values()])
            row[column] = mean
            if multi and column not in PARAM_COLUMNS:
                row[f"{column}_std"] = std
        rows[kind] = row
    oracle = _oracle_row(metrics, types, scenarios)
    if oracle:
        rows[ORACLE_ROW] = oracle
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    return table


def _oracle_row(metrics: dict[str, dict[int, dict[str, Any]]], types: Sequence[str],
                scenarios: Sequence[str]) -> dict[str, float]:
    """The generator's true probabilities scored on the same holdout rows: the ceiling every
    model's row is read against. The rows are the same for every run, so one run's is enough."""
    first = next((m for per_seed in metrics.values() for m in per_seed.values()
                  if m.get("oracle_cvr_auc") is not None), None)
    if first is None:
        return {}
    return {column: _value(first, f"oracle_{key}") for column, key in auc_columns(types, scenarios)}


def to_markdown(table: pd.DataFrame, types: Sequence[str], scenarios: Sequence[str],
                caption: str) -> str:
    """The table as GitHub Markdown: ``mean ± std`` cells, the best model per column bold."""
    columns = [c for c, _ in auc_columns(types, scenarios)]
    header = ["model", *columns, *PARAM_COLUMNS]
    models = table.drop(index=ORACLE_ROW, errors="ignore")
    best = {c: models[c].max(skipna=True) for c in columns}
    lines = [caption, "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for kind, row in table.iterrows():
        is_model = kind != ORACLE_ROW
        cells = [f"`{kind}`" if is_model else f"*{kind}*"]
        for c in columns:
            mean, std = row[c], row.get(f"{c}_std", float("nan"))
            if math.isnan(mean):
                cells.append("n/a")
                continue
            text = f"{mean:.4f}" + ("" if math.isnan(std) else f" ± {std:.4f}")
            cells.append(f"**{text}**" if is_model and mean == best[c] and len(models) > 1 else text)
        cells += [("n/a" if math.isnan(row.get(c, float("nan"))) else f"{int(row[c]):,}") for c in PARAM_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- heatmap


def domain_gain(metrics: dict[str, dict[int, dict[str, Any]]], types: Sequence[str],
                scenarios: Sequence[str], model: str = GAIN_MODEL,
                base: str = GAIN_BASE) -> np.ndarray:
    """[types, scenarios] mean over seeds of model's CVR AUC minus base's, paired by seed
    (NaN where either AUC is undefined in every seed)."""
    grid = np.full((len(types), len(scenarios)), np.nan)
    seeds = sorted(set(metrics[model]) & set(metrics[base]))
    for i, t in enumerate(types):
        for j, s in enumerate(scenarios):
            key = f"cvr_auc_domain/{t}/{s}"
            diffs = [_value(metrics[model][k], key) - _value(metrics[base][k], key) for k in seeds]
            grid[i, j] = mean_std(diffs)[0]
    return grid


def gain_heatmap(grid: np.ndarray, types: Sequence[str], scenarios: Sequence[str], path: Path,
                 title: str) -> Path:
    """Diverging heatmap of the AUC gain, annotated per cell; written with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.9 * len(scenarios) + 3.0), max(3.8, 0.45 * len(types) + 2.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = np.abs(grid[np.isfinite(grid)])
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 0.01
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            text = "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:+.3f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(scenarios)), list(scenarios), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(types)), list(types), fontsize=8)
    ax.set_xlabel("display scenario")
    ax.set_ylabel("conversion type")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="CVR AUC gain")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# ----------------------------------------------------------------------------- bootstrap


def _clicked(predictions: pd.DataFrame) -> pd.DataFrame:
    """The rows and columns the bootstrap needs: clicked holdout rows, in predict order."""
    columns = [c for c in BOOTSTRAP_COLUMNS if c in predictions]
    return predictions.loc[predictions["click"] > 0, columns].reset_index(drop=True)


def bootstrap_intervals(cfg: PipelineConfig, holdout: dict[str, dict[int, pd.DataFrame]],
                        reference: str | None) -> dict[str, dict[str, Any]]:
    """Per model (and the oracle): an interval for every average, of the mean over seeds,
    and the paired interval of (model - reference); see training/stats.py."""
    from training.stats import average_samples, intervals, seed_mean, stratified_resamples

    frames = [f for per_seed in holdout.values() for f in per_seed.values()]
    if not frames or frames[0].empty:
        return {}
    first = frames[0]
    for frame in frames[1:]:  # paired resamples need the same rows in the same order
        if not (frame[["type_id", "scenario_id", "conversion"]].to_numpy()
                == first[["type_id", "scenario_id", "conversion"]].to_numpy()).all():
            raise ValueError("models were scored on different holdout rows; cannot pair them")
    ev = cfg.evaluation
    resamples = stratified_resamples(first, ev.bootstrap_samples, ev.min_domain_conversions, seed=0)
    samples = {kind: seed_mean([average_samples(resamples, f["p_cvr"].to_numpy())
                                for f in per_seed.values()])
               for kind, per_seed in holdout.items() if per_seed}
    if "oracle_p_conversion" in first and first["oracle_p_conversion"].notna().all():
        samples[ORACLE_ROW] = average_samples(resamples, first["oracle_p_conversion"].to_numpy())
    return intervals(samples, reference, ev.confidence)


def intervals_markdown(bounds: dict[str, dict[str, Any]], reference: str | None, caption: str) -> str:
    """Two Markdown tables: every average with its interval; (model - reference) paired."""

    def cell(iv: Any) -> str:
        if iv is None or math.isnan(iv.estimate):
            return "n/a"
        if math.isnan(iv.low):
            return f"{iv.estimate:.4f}"
        return f"{iv.estimate:.4f} [{iv.low:.4f}, {iv.high:.4f}]"

    head = "| model | " + " | ".join(SUMMARY_COLUMNS) + " |"
    rule = "|" + "|".join(["---"] + ["---:"] * len(SUMMARY_COLUMNS)) + "|"
    lines = [caption, "", head, rule]
    for kind, row in bounds.items():
        lines.append(f"| `{kind}` | " + " | ".join(cell(row.get(c)) for c in SUMMARY_COLUMNS) + " |")
    if reference is not None:
        lines += ["", f"Paired difference (model - `{reference}`), same resampled rows:", "", head, rule]
        for kind, row in bounds.items():
            if kind != reference and f"{SUMMARY_COLUMNS[0]}_vs_ref" in row:
                lines.append(f"| `{kind}` | "
                             + " | ".join(cell(row.get(f"{c}_vs_ref")) for c in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _interval_metrics(bounds: dict[str, dict[str, Any]], reference: str | None) -> dict[str, float]:
    """Parent-run metrics: <kind>/<average>_ci_low|high and <kind>/<average>_minus_<ref>[_ci_*]."""
    out: dict[str, float] = {}
    for kind, row in bounds.items():
        for name, iv in row.items():
            base = name[:-len("_vs_ref")] + f"_minus_{reference}" if name.endswith("_vs_ref") else name
            if name.endswith("_vs_ref"):
                out[f"{kind}/{base}"] = iv.estimate
            out[f"{kind}/{base}_ci_low"] = iv.low
            out[f"{kind}/{base}_ci_high"] = iv.high
    return {k: float(v) for k, v in out.items() if not math.isnan(v)}


# ----------------------------------------------------------------------------- driver


def _check_kinds(kinds: Sequence[str]) -> list[str]:
    kinds = [k.strip() for k in kinds if k.strip()]
    if not kinds:
        raise ValueError("compare() needs at least one model kind")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"model kinds repeat: {kinds}")
    unknown = sorted(set(kinds) - set(COMPARISON_KINDS))
    if unknown:
        raise ValueError(f"unknown model kinds {unknown}; available: {sorted(COMPARISON_KINDS)}")
    return kinds


def compare(
    cfg: PipelineConfig,
    day: str,
    kinds: list[str],
    *,
    seeds: Sequence[int] | None = None,
    experiment: str | None = None,
    reference: str | None = None,
) -> ComparisonResult:
    """Train and evaluate every kind for every seed on ``day``; log and return the table.

    ``reference`` (default: ``mmn`` when compared, else the first kind) is the model every
    paired bootstrap difference is taken against."""
    from mlflow.tracking import MlflowClient

    from mmn.tasks import evaluate_day, parse_day, setup_mlflow, train_day, vocab_lists

    day = parse_day(day).isoformat()
    kinds = _check_kinds(kinds)
    reference = reference or (GAIN_MODEL if GAIN_MODEL in kinds else kinds[0])
    if reference not in kinds:
        raise ValueError(f"reference {reference!r} is not among the kinds {kinds}")
    seeds = [int(s) for s in (seeds if seeds is not None else (cfg.training.seed,))]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds}")
    types, scenarios = vocab_lists(cfg)
    experiment = experiment or f"{cfg.mlflow.experiment}_comparison"
    experiment_id = setup_mlflow(cfg, experiment)
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    comparison_id = uuid.uuid4().hex[:12]
    parent = client.create_run(experiment_id, run_name=f"comparison {day}", tags={
        "comparison_id": comparison_id, "data_date": day, "comparison_kinds": ",".join(kinds),
        "comparison_seeds": ",".join(map(str, seeds)), "config_hash": cfg.config_hash(),
    })
    parent_id = parent.info.run_id
    client.log_param(parent_id, "kinds", ",".join(kinds))
    client.log_param(parent_id, "seeds", ",".join(map(str, seeds)))
    client.log_param(parent_id, "day", day)
    client.log_param(parent_id, "reference", reference)
    child_runs: dict[str, dict[int, str]] = {k: {} for k in kinds}
    metrics: dict[str, dict[int, dict[str, float | None]]] = {k: {} for k in kinds}
    holdout: dict[str, dict[int, pd.DataFrame]] = {k: {} for k in kinds}
    try:
        for seed in seeds:
            # evaluate_day re-activates cfg.mlflow.experiment before reopening the run, so
            # the children's config names the comparison experiment.
            seeded = cfg.with_overrides({"training.seed": seed, "mlflow.experiment": experiment})
            tags = {"comparison_id": comparison_id, "comparison_seed": str(seed)}
            for kind in kinds:
                log.info("comparison %s: training %s with seed %d", comparison_id, kind, seed)
                if kind in PEER_KINDS:
                    run_id, challenger, predictions = peer_runs.train_peer_day(
                        seeded, day, kind, experiment=experiment, extra_tags=tags,
                        parent_run_id=parent_id)
                else:
                    run_id = train_day(seeded, day, model_kind=kind, experiment=experiment,
                                       extra_tags=tags, parent_run_id=parent_id)
                    challenger = evaluate_day(seeded, day, run_id)["challenger"]
                    predictions = peer_runs.run_predictions(seeded, day, run_id)
                run_metrics = client.get_run(run_id).data.metrics
                child_runs[kind][seed] = run_id
                metrics[kind][seed] = {**challenger,
                                       **{c: run_metrics.get(f"model/{c}") for c in PARAM_COLUMNS}}
                holdout[kind][seed] = _clicked(predictions)
        bounds = bootstrap_intervals(cfg, holdout, reference)
        result = _report(cfg, client, comparison_id, day, experiment_id, parent_id, kinds, seeds,
                         child_runs, metrics, types, scenarios, reference, bounds)
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    client.set_terminated(parent_id, status="FINISHED")
    return result


def _report(cfg: PipelineConfig, client: Any, comparison_id: str, day: str, experiment_id: str,
            parent_id: str, kinds: list[str], seeds: list[int],
            child_runs: dict[str, dict[int, str]], metrics: dict[str, dict[int, dict[str, Any]]],
            types: list[str], scenarios: list[str], reference: str | None = None,
            bounds: dict[str, dict[str, Any]] | None = None) -> ComparisonResult:
    """Write the table (Markdown, CSV), raw metrics (JSON) and heatmap; log them to the parent."""
    bounds = bounds or {}
    table = comparison_table(metrics, types, scenarios)
    spread = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    caption = (f"Holdout CVR AUC (clicked impressions) of {day}, per conversion type and display "
               f"scenario; {spread}. Comparison `{comparison_id}`.")
    markdown = to_markdown(table, types, scenarios, caption)
    if bounds:
        ev = cfg.evaluation
        markdown += "\n" + intervals_markdown(bounds, reference, (
            f"Averages with {ev.confidence:.0%} bootstrap intervals ({ev.bootstrap_samples} "
            f"resamples of each domain's clicked holdout rows; {spread}; observed_domain_avg: "
            f"domains with >= {ev.min_domain_conversions} holdout conversions)."))
    out = cfg.paths.reports_root / "comparisons" / f"{day}_{comparison_id}"
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "comparison.md", "csv": out / "comparison.csv",
             "json": out / "comparison.json"}
    files["markdown"].write_text(markdown)
    table.to_csv(files["csv"], float_format="%.6f")
    files["json"].write_text(json.dumps(
        {"comparison_id": comparison_id, "day": day, "kinds": kinds, "seeds": seeds,
         "runs": child_runs, "metrics": metrics, "reference": reference,
         "intervals": {k: {n: vars(iv) for n, iv in row.items()} for k, row in bounds.items()}},
        indent=1, default=str))
    if GAIN_MODEL in metrics and GAIN_BASE in metrics:
        grid = domain_gain(metrics, types, scenarios)
        over = f"mean over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
        files["heatmap"] = gain_heatmap(
            grid, types, scenarios, out / "mmn_gain_over_dnn.png",
            f"{GAIN_MODEL} CVR AUC gain over {GAIN_BASE}\nholdout {day}, {over}")
    else:
        log.info("no heatmap: it needs both %r and %r among the kinds", GAIN_MODEL, GAIN_BASE)
    for path in files.values():
        client.log_artifact(parent_id, str(path), artifact_path=ARTIFACT_DIR)
    summary = {f"{kind}/{column}": value for kind, row in table.iterrows()
               for column, value in row.items()
               if column in SUMMARY_COLUMNS and not math.isnan(value)}
    summary.update(_interval_metrics(bounds, reference))
    for key, value in summary.items():
        client.log_metric(parent_id, key, float(value))
    return ComparisonResult(comparison_id=comparison_id, day=day, experiment_id=experiment_id,
                            parent_run_id=parent_id, kinds=kinds, seeds=seeds,
                            child_runs=child_runs, metrics=metrics, table=table,
                            markdown=markdown, files=files, reference=reference, intervals=bounds)


# ----------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmn.compare",
        description="Train MMN and baselines on one day; log a paper-style CVR AUC table to MLflow.")
    parser.add_argument("--day", required=True, help="the day to train for and hold out (YYYY-MM-DD)")
    parser.add_argument("--kinds", required=True, help="comma-separated model kinds, e.g. mmn,dnn,star")
    parser.add_argument("--seeds", type=_int_list, default=None,
                        help="comma-separated training seeds (default: cfg.training.seed)")
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment (default: <mlflow.experiment>_comparison)")
    parser.add_argument("--reference", default=None,
                        help="model the paired bootstrap differences are taken against "
                             "(default: mmn when compared, else the first kind)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.config, overrides=args.overrides)
    result = compare(cfg, args.day, args.kinds.split(","), seeds=args.seeds, experiment=args.experiment,
                     reference=args.reference)
    sys.stdout.write(result.markdown)
    json.dump({"comparison_id": result.comparison_id, "parent_run_id": result.parent_run_id,
               "experiment_id": result.experiment_id,
               "files": {k: str(v) for k, v in result.files.items()}}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
