"""MLflow and provenance helpers shared by the task modules (tracking store, commit, vocab).

They sit apart from the task functions so the gate, train and evaluate modules can use them
without importing each other.
"""

from __future__ import annotations

import math
import os
import subprocess
from collections.abc import Mapping
from typing import Any

from core.config import REPO_ROOT, PipelineConfig
from core.contracts import OBSERVED_AVG


def setup_mlflow(cfg: PipelineConfig, experiment: str | None = None) -> str:
    """Point MLflow at the configured store and make sure the experiment exists."""
    import mlflow

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_registry_uri(cfg.mlflow.tracking_uri)
    name = experiment or cfg.mlflow.experiment
    if os.environ.get("MLFLOW_RUN_ID"):
        # Under `mlflow run`, the project's run already fixes the experiment.
        return mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
    found = mlflow.get_experiment_by_name(name)
    if found is None and cfg.mlflow.tracking_uri.startswith(("http://", "https://")):
        # A tracking server picks the location (its artifact proxy, mlflow-artifacts:/), which
        # every worker reaches over HTTP; a local artifact_root would exist on this host only.
        exp_id = mlflow.create_experiment(name)
    elif found is None:
        cfg.mlflow.artifact_root.mkdir(parents=True, exist_ok=True)
        exp_id = mlflow.create_experiment(name, artifact_location=(cfg.mlflow.artifact_root / name).as_uri())
    else:
        exp_id = found.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def vocab_lists(cfg: PipelineConfig) -> tuple[list[str], list[str]]:
    from core.vocab import load_vocab

    types = load_vocab(cfg.paths.vocab_dir, cfg.domains.type_field).values()
    scenarios = load_vocab(cfg.paths.vocab_dir, cfg.domains.scenario_field).values()
    if not types or not scenarios:
        raise RuntimeError(f"domain vocabularies under {cfg.paths.vocab_dir} are empty: build a day first")
    return types, scenarios


def metrics_to_log(metrics: Mapping[str, Any], *, prefix: str = "", per_domain: bool = True,
                   ) -> dict[str, float]:
    """The one filter before ``mlflow.log_metrics``: training.metrics.loggable (drops
    undefined values), then non-finite ones (MLflow stores no NaN/inf); ``per_domain=False``
    also drops the per-domain breakdown (it goes to the per-domain table artifact)."""
    from training.metrics import loggable

    kept = {k: v for k, v in metrics.items() if per_domain or "_domain/" not in k}
    return {f"{prefix}{k}": v for k, v in loggable(kept).items() if math.isfinite(v)}


# ------------------------------------------------------------------ the runs table's view
# A handful of short top-level metrics per run, distinct in their first characters so the
# runs table's truncated headers still tell them apart. The champion's copies sort after the
# challenger's ("champ_" > "auc_"), so a run's metric view opens on the challenger.
HEADLINE = {
    "auc_type": "cvr_auc_type_avg",
    "auc_scenario": "cvr_auc_scenario_avg",
    "auc_observed": OBSERVED_AVG,
    "auc_overall": "cvr_auc",
}
CHAMPION_PREFIX = "champ_"
GATE_MARGIN = "gate_margin"
LOGGED_MODEL_SUFFIX = "_cvr"  # the logged model of kind K is named "K_cvr" (not "model")


def logged_model_name(kind: str) -> str:
    """The name a run's serving model is logged under (its ``runs:/<id>/<name>`` path)."""
    return f"{kind}{LOGGED_MODEL_SUFFIX}"


def logged_model_uri(run: Any) -> str:
    """The serving model of a training run: its ``model_uri`` tag (train_day sets it); runs
    logged before the model had a name fall back to ``runs:/<id>/model``."""
    return run.data.tags.get("model_uri") or f"runs:/{run.info.run_id}/model"


def headline_metrics(metrics: Mapping[str, Any], *, prefix: str = "") -> dict[str, float]:
    """The run's headline CVR AUCs (HEADLINE's short names) from evaluation metrics."""
    picked = {f"{prefix}{short}": metrics.get(key) for short, key in HEADLINE.items()}
    return metrics_to_log(picked)


def summary_metrics(metrics: Mapping[str, Any], *, prefix: str = "holdout/") -> dict[str, float]:
    """The holdout's aggregates under ``prefix``: every metric without a per-type, per-scenario
    or per-domain breakdown ("/" in its name), and of the oracle only its gate-metric ceiling.
    The breakdowns go to logged tables (evaluation/per_*.json)."""
    kept = {k: v for k, v in metrics.items()
            if "/" not in k and (not k.startswith("oracle_") or k == "oracle_cvr_auc_type_avg")}
    return metrics_to_log(kept, prefix=prefix)


def axis_table(challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, axis: str,
               names: list[str]) -> dict[str, list[Any]]:
    """One row per conversion type (``axis="type"``) or scenario: holdout clicks and
    conversions, the challenger's and champion's CVR AUC and their difference, the oracle's."""
    rows: dict[str, list[Any]] = {axis: [], "n_clicks": [], "n_conversions": [], "cvr_auc": [],
                                  "champion_cvr_auc": [], "delta": [], "oracle_cvr_auc": []}
    for name in names:
        clicks = challenger.get(f"n_clicks_{axis}/{name}")
        if clicks is None:
            continue  # absent from the holdout
        mine = challenger.get(f"cvr_auc_{axis}/{name}")
        theirs = champion.get(f"cvr_auc_{axis}/{name}") if champion else None
        rows[axis].append(name)
        rows["n_clicks"].append(int(clicks))
        rows["n_conversions"].append(int(challenger.get(f"n_conversions_{axis}/{name}") or 0))
        rows["cvr_auc"].append(_rounded(mine))
        rows["champion_cvr_auc"].append(_rounded(theirs))
        rows["delta"].append(_rounded(mine - theirs) if mine is not None and theirs is not None else None)
        rows["oracle_cvr_auc"].append(_rounded(challenger.get(f"oracle_cvr_auc_{axis}/{name}")))
    return rows


def _rounded(value: Any, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), digits)


def log_day_datasets(cfg: PipelineConfig, train_days: list[str], holdout_day: str,
                     digest: Any) -> None:
    """Log the training days and the holdout day as the active run's dataset inputs (context
    ``training``, ``holdout``, or ``training+holdout`` for a cold start's split day): one
    dataset per day's samples partition, its digest ``digest(cfg, day)`` (the checkpoint's
    day identity: the manifest's bytes and the files' names, sizes and times)."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    # The holdout first: the runs table's Dataset column shows a run's first input. A cold
    # start trains on a hash split of the holdout day: one dataset, both roles.
    contexts = {holdout_day: "training+holdout" if holdout_day in train_days else "holdout"}
    contexts.update({d: "training" for d in train_days if d != holdout_day})
    for day, context in contexts.items():
        path = cfg.paths.samples_dir(day)
        with warnings.catch_warnings():  # the local path matches two equivalent source kinds
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(path))
        dataset = MetaDataset(source, name=f"samples dt={day}", digest=digest(cfg, day))
        mlflow.log_input(dataset, context=context, tags={"day": day})


def model_description(cfg: PipelineConfig, kind: str, day: str) -> str:
    """What a registered version is and what a request sends it (the model is logged with no
    input schema, see serving.pyfunc.log_serving_model, so the fields are described here)."""
    from serving.pyfunc import input_columns

    required = set(cfg.logs["impressions"].required)
    fields = ", ".join(f"`{f}`{' (required)' if f in required else ''}" for f in input_columns(cfg))
    return (
        f"{kind} CVR model for impression day {day}. Input: raw impression records "
        f"(`dataframe_records`), one row each, fields {fields}; strings as strings, numbers "
        "finite, the domain values in the model's vocabulary. Output per record: `p_ctr`, "
        "`p_cvr`, `p_ctcvr` and `error` (why a record could not be scored; null otherwise)."
    )


def gate_note(summary: Mapping[str, Any]) -> str:
    """The run description after the gate, one sentence: day, decision, reason."""
    decision = summary.get("decision", "?")
    version = f" as v{summary['version']}" if summary.get("version") else ""
    verb = {"promoted": "promoted to champion", "rejected": "rejected by the gate",
            "refused": "refused (the champion moved during the comparison)",
            "dry_run": "not registered (dry run); the gate would have "
                       + ("promoted" if summary.get("would_promote") else "rejected")}.get(decision, decision)
    return f"Impression day {summary.get('day')}: challenger {verb}{version} — {summary.get('reason', '')}."


def gated_run_name(kind: str, summary: Mapping[str, Any]) -> str:
    """A gated run's name: model, day, decision (and version), the gate metric's value,
    e.g. ``mmn 2026-11-03 · promoted v3 · auc_type 0.581``."""
    version = f" v{summary['version']}" if summary.get("version") else ""
    metric = summary.get("metric") or ""
    short = {key: name for name, key in HEADLINE.items()}.get(metric, metric)
    score = summary.get("challenger")
    scored = f" · {short} {float(score):.3f}" if score is not None else ""
    return f"{kind} {summary.get('day')} · {summary.get('decision')}{version}{scored}"


def record_gate(cfg: PipelineConfig, summary: Mapping[str, Any]) -> str:
    """After the gate: the run's description (``mlflow.note.content``) says the decision in
    one sentence, its name gets the decision and score (gated_run_name), and the registered version gets its description (what it is, what it
    reads, the decision). Idempotent. Returns the run's MLflow UI address."""
    from mlflow import MlflowClient

    from mmn.orchestration import mlflow_run_url

    setup_mlflow(cfg)
    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    note = gate_note(summary)
    kind = run.data.tags.get("model_kind", cfg.model.kind)
    client.set_tag(run.info.run_id, "mlflow.note.content", note)
    # The runs table shows run names without configuring anything: day, model, decision, score.
    client.set_tag(run.info.run_id, "mlflow.runName", gated_run_name(kind, summary))
    if summary.get("version"):
        client.update_model_version(cfg.mlflow.registered_model, str(summary["version"]),
                                    description=f"{model_description(cfg, kind, str(summary['day']))}\n\n{note}")
    return mlflow_run_url(cfg, run.info.experiment_id, run.info.run_id)
