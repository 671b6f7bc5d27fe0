"""Evaluate a trained run: challenger and current champion scored on the same holdout."""

from __future__ import annotations

from typing import Any

from core.config import PipelineConfig
from mmn.tracking import metrics_to_log, setup_mlflow, vocab_lists

EVAL_ARTIFACT = "evaluation/holdout_eval.json"


def evaluate_day(cfg: PipelineConfig, day: str, run_id: str) -> dict[str, Any]:
    """Score the challenger and the current champion on the same holdout; log both."""
    import mlflow

    from serving.plots import log_domain_plots
    from serving.pyfunc import load_serving_model
    from serving.registry import CHAMPION, alias_version, client_for
    from training.metrics import gate_conversions

    setup_mlflow(cfg)
    # The holdout must match what training left out: the run records whether it split day D.
    cold_start = mlflow.get_run(run_id).data.tags.get("cold_start") == "true"
    challenger = load_serving_model(f"runs:/{run_id}/model")
    challenger_metrics, table = _score(cfg, challenger, day, cold_start)
    client = client_for(cfg)
    champion_version = alias_version(client, cfg.mlflow.registered_model, CHAMPION)
    champion_metrics, champion_note = None, "no champion yet"
    if champion_version is not None:
        champion = load_serving_model(f"models:/{cfg.mlflow.registered_model}@{CHAMPION}")
        reason = _incompatibility(cfg, champion, *vocab_lists(cfg))
        if reason:
            champion_note = f"champion v{champion_version} not comparable: {reason}"
        else:
            champion_metrics, _ = _score(cfg, champion, day, cold_start)
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
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics_to_log(challenger_metrics, prefix="holdout/", per_domain=False))
        if champion_metrics:
            mlflow.log_metrics(metrics_to_log(champion_metrics, prefix="champion_holdout/", per_domain=False))
        undefined = sorted(k for k, v in challenger_metrics.items() if v is None)
        mlflow.set_tag("holdout.undefined_metrics", ",".join(undefined)[:4900] or "none")
        mlflow.log_dict(result, EVAL_ARTIFACT)
        mlflow.log_table(table, "evaluation/per_domain.json")
        log_domain_plots(challenger_metrics, table, types=challenger.bundle.types,
                         scenarios=challenger.bundle.scenarios)
    return result


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


def _incompatibility(cfg: PipelineConfig, champion: Any, types: list[str], scenarios: list[str]) -> str | None:
    """Why the champion can't score today's rows: changed hashing/features, or new domains."""
    if [vars(f) for f in champion.cfg.features] != [vars(f) for f in cfg.features]:
        return "feature fields or buckets changed"
    if champion.cfg.hashing != cfg.hashing:
        return "hashing changed"
    if len(types) > champion.model.n_types or len(scenarios) > champion.model.n_scenarios:
        return "new conversion types or scenarios appeared since it was trained"
    return None


def load_evaluation(cfg: PipelineConfig, run_id: str) -> dict[str, Any]:
    """The evaluation an earlier `evaluate` step logged on the run (for a gate run by hand)."""
    import mlflow

    setup_mlflow(cfg)
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{EVAL_ARTIFACT}")
