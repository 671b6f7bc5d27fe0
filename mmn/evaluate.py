"""Evaluate a trained run: challenger and current champion scored on the same holdout."""

from __future__ import annotations

from typing import Any

from core.config import PipelineConfig
from mmn.tracking import (
    CHAMPION_PREFIX,
    GATE_MARGIN,
    axis_table,
    headline_metrics,
    logged_model_uri,
    setup_mlflow,
    summary_metrics,
)

EVAL_ARTIFACT = "evaluation/holdout_eval.json"


def evaluate_day(cfg: PipelineConfig, day: str, run_id: str) -> dict[str, Any]:
    """Score the challenger and the current champion on the same holdout; log both.

    The run gets a few headline metrics (mmn.tracking.HEADLINE: the challenger's, then the
    champion's under ``champ_``, and ``gate_margin``), the holdout's aggregates under
    ``holdout/``, the per-type / per-scenario / per-domain detail as logged tables, the
    evaluation JSON and the per-domain plots.
    """
    import mlflow

    from serving.plots import log_domain_plots
    from serving.pyfunc import load_serving_model
    from serving.registry import CHAMPION, alias_version, client_for
    from training.metrics import gate_conversions

    setup_mlflow(cfg)
    # The holdout must match what training left out: the run records whether it split day D.
    run = mlflow.get_run(run_id)
    cold_start = run.data.tags.get("cold_start") == "true"
    challenger = load_serving_model(logged_model_uri(run))
    challenger_metrics, table = _score(cfg, challenger, day, cold_start)
    client = client_for(cfg)
    name = cfg.mlflow.registered_model
    champion_version = alias_version(client, name, CHAMPION)
    champion_metrics, champion_table, champion_note = None, None, "no champion yet"
    if champion_version is not None:
        # Load the version the alias named when read, not the alias: if it moves meanwhile,
        # the scores still belong to the version recorded (and the gate refuses the move).
        champion = load_serving_model(f"models:/{name}/{champion_version}")
        reason = _incompatibility(cfg, champion, holdout_domain_ids(cfg, day))
        if reason:
            champion_note = f"champion v{champion_version} not comparable: {reason}"
        else:
            champion_metrics, champion_table = _score(cfg, champion, day, cold_start)
            champion_note = f"champion v{champion_version} scored on the same holdout"
    conversions = gate_conversions(challenger_metrics)
    result = {
        "day": day,
        "run_id": run_id,
        "holdout": "split" if cold_start else "day",
        "challenger": challenger_metrics,
        "champion": champion_metrics,
        "champion_version": champion_version,
        "champion_note": champion_note,
        "conversions": conversions,
    }
    types, scenarios = challenger.bundle.types, challenger.bundle.scenarios
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({**headline_metrics(challenger_metrics), **summary_metrics(challenger_metrics)})
        if champion_metrics:
            mlflow.log_metrics(headline_metrics(champion_metrics, prefix=CHAMPION_PREFIX))
            margin = gate_margin(cfg, challenger_metrics, champion_metrics)
            if margin is not None:
                mlflow.log_metric(GATE_MARGIN, margin)
        undefined = sorted(k for k, v in challenger_metrics.items() if v is None)
        mlflow.set_tag("holdout.undefined_metrics", ",".join(undefined)[:4900] or "none")
        mlflow.set_tag("holdout.champion", champion_note)
        mlflow.set_tag("mlflow.note.content", evaluation_note(cfg, result))
        mlflow.log_dict(result, EVAL_ARTIFACT)
        mlflow.log_table(domain_table(table, champion_table), "evaluation/per_domain.json")
        mlflow.log_table(axis_table(challenger_metrics, champion_metrics, "type", types),
                         "evaluation/per_type.json")
        mlflow.log_table(axis_table(challenger_metrics, champion_metrics, "scenario", scenarios),
                         "evaluation/per_scenario.json")
        log_domain_plots(challenger_metrics, table, types=types, scenarios=scenarios,
                         champion=champion_metrics,
                         champion_label=f"champion v{champion_version}" if champion_metrics else None)
    return result


def gate_margin(cfg: PipelineConfig, challenger: dict[str, Any], champion: dict[str, Any]) -> float | None:
    """The challenger's gate metric minus the champion's (None when either is undefined)."""
    mine, theirs = challenger.get(cfg.gate.metric), champion.get(cfg.gate.metric)
    if mine is None or theirs is None:
        return None
    return float(mine) - float(theirs)


def evaluation_note(cfg: PipelineConfig, result: dict[str, Any]) -> str:
    """The run description after evaluation (the gate replaces it with its decision)."""
    metric = cfg.gate.metric
    mine = result["challenger"].get(metric)
    text = f"Impression day {result['day']}: challenger {metric} = {_fmt(mine)} on the holdout"
    if result["champion"]:
        theirs = result["champion"].get(metric)
        text += f", champion v{result['champion_version']} {_fmt(theirs)}"
    else:
        text += f" ({result['champion_note']})"
    return text + "; gate not applied yet."


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


def domain_table(table: Any, champion_table: Any | None) -> Any:
    """The per-domain table with the champion's CVR AUC beside the challenger's."""
    out = table.copy()
    if champion_table is not None and len(champion_table):
        theirs = champion_table.set_index(["type_id", "scenario_id"])["cvr_auc"]
        keys = list(zip(out["type_id"], out["scenario_id"], strict=True))
        out["champion_cvr_auc"] = [theirs.get(k) for k in keys]
    return out


def _score(cfg: PipelineConfig, serving: Any, day: str, cold_start: bool) -> tuple[dict, Any]:
    """Holdout metrics and the per-domain table of one model (one prediction pass)."""
    from training.metrics import metrics_from_predictions, per_domain_table, predict_rows

    predictions = predict_rows(
        serving.model, cfg, [day],
        split="holdout" if cold_start else None,
        holdout_fraction=cfg.windows.cold_start_holdout_fraction,
    )
    if predictions.empty:
        raise ValueError(f"the holdout of {day} has no rows")
    types, scenarios = serving.bundle.types, serving.bundle.scenarios
    metrics = metrics_from_predictions(predictions, types, scenarios,
                                       cfg.evaluation.min_domain_conversions)
    return metrics, per_domain_table(predictions, types, scenarios)


def holdout_domain_ids(cfg: PipelineConfig, day: str) -> tuple[int, int]:
    """The largest conversion type id and scenario id in the day's samples (-1 when empty)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from core.contracts import SCENARIO_ID, TYPE_ID

    table = ds.dataset(str(cfg.paths.samples_dir(day)), format="parquet").to_table(
        columns=[TYPE_ID, SCENARIO_ID])
    if table.num_rows == 0:
        return -1, -1
    return int(pc.max(table[TYPE_ID]).as_py()), int(pc.max(table[SCENARIO_ID]).as_py())


def _incompatibility(cfg: PipelineConfig, champion: Any, holdout_ids: tuple[int, int]) -> str | None:
    """Why the champion can't score the holdout: changed hashing or features, or holdout rows
    of a conversion type or scenario it has no parameters for. A vocabulary that grew is not
    a reason by itself: the ids are append-only, so it scores rows of the domains it knows."""
    if [vars(f) for f in champion.cfg.features] != [vars(f) for f in cfg.features]:
        return "feature fields or buckets changed"
    if champion.cfg.hashing != cfg.hashing:
        return "hashing changed"
    max_type, max_scenario = holdout_ids
    n_types = min(champion.model.n_types, len(champion.bundle.types))
    n_scenarios = min(champion.model.n_scenarios, len(champion.bundle.scenarios))
    if max_type >= n_types or max_scenario >= n_scenarios:
        return (f"the holdout has conversion types or scenarios it was not trained on (ids up to "
                f"{max_type}/{max_scenario}; it knows {n_types} types, {n_scenarios} scenarios)")
    return None


def load_evaluation(cfg: PipelineConfig, run_id: str) -> dict[str, Any]:
    """The evaluation an earlier `evaluate` step logged on the run (for a gate run by hand)."""
    import mlflow

    setup_mlflow(cfg)
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{EVAL_ARTIFACT}")
