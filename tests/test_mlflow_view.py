"""What a person sees in MLflow (issue 18 item 2): a handful of short headline metrics per
run (the champion's under a prefix that sorts after), the per-domain detail as logged tables,
a run description with the gate decision, version descriptions, dataset inputs with digests,
a named logged model, plots with conversion counts and the champion overlaid, the day's Data
Docs page on its own; the champion scored by its version number and still comparable when
only the vocabulary grew."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from core.config import load_config
from mmn.evaluate import _incompatibility, evaluate_day, gate_margin
from mmn.gate import gate_day
from mmn.tracking import (
    CHAMPION_PREFIX,
    GATE_MARGIN,
    HEADLINE,
    axis_table,
    headline_metrics,
    logged_model_name,
    record_gate,
    summary_metrics,
)
from mmn.train import train_day
from simulation.synthetic import write_days, write_raw_impressions, write_vocabs

DAYS = ["2024-05-01", "2024-05-02"]
SMALL_FEATURES = [
    {"name": "user_id", "kind": "categorical", "buckets": 500},
    {"name": "ad_id", "kind": "categorical", "buckets": 200},
    {"name": "user_age", "kind": "numeric", "boundaries": [18, 25, 35, 45, 55, 65]},
]
METRICS = {
    "cvr_auc": 0.70, "cvr_auc_type_avg": 0.71, "cvr_auc_scenario_avg": 0.69,
    "cvr_auc_domain_avg_observed": 0.72, "cvr_auc_domain_avg": 0.6, "ctr_auc": 0.8,
    "cvr_auc_type/a": 0.71, "cvr_auc_type/b": None, "n_clicks_type/a": 40.0,
    "n_conversions_type/a": 7.0, "n_clicks_type/b": 3.0, "n_conversions_type/b": 0.0,
    "cvr_auc_domain/a/x": 0.7, "n_conversions_domain/a/x": 7.0, "oracle_cvr_auc": 0.9,
    "oracle_cvr_auc_type_avg": 0.88, "oracle_cvr_auc_type/a": 0.9,
}


def test_headline_names_are_short_distinct_and_the_champion_sorts_after():
    mine = headline_metrics(METRICS)
    theirs = headline_metrics(METRICS, prefix=CHAMPION_PREFIX)
    assert mine == {"auc_type": 0.71, "auc_scenario": 0.69, "auc_observed": 0.72, "auc_overall": 0.70}
    assert all(len(k) <= 12 for k in mine)
    assert len({k[:6] for k in mine}) == len(mine)  # distinct in what a narrow header shows
    assert max(mine) < min(theirs) < GATE_MARGIN  # challenger first, then champion, then margin
    assert set(HEADLINE.values()) <= set(METRICS)


def test_summary_keeps_aggregates_and_leaves_the_breakdowns_to_tables():
    summary = summary_metrics(METRICS)
    assert "holdout/cvr_auc" in summary and "holdout/cvr_auc_type_avg" in summary
    assert "holdout/oracle_cvr_auc_type_avg" in summary
    assert not [k for k in summary if k.count("/") > 1 or "oracle_cvr_auc" == k.split("/")[-1]]
    table = axis_table(METRICS, {"cvr_auc_type/a": 0.65}, "type", ["a", "b", "c"])
    assert table["type"] == ["a", "b"]  # "c" is absent from the holdout
    assert table["n_conversions"] == [7, 0] and table["champion_cvr_auc"] == [0.65, None]
    assert table["delta"] == [pytest.approx(0.06), None] and table["oracle_cvr_auc"] == [0.9, None]


def _champion(n_types: int, n_scenarios: int, cfg):
    return SimpleNamespace(cfg=cfg, model=SimpleNamespace(n_types=n_types, n_scenarios=n_scenarios),
                           bundle=SimpleNamespace(types=["t"] * n_types, scenarios=["s"] * n_scenarios))


def test_a_grown_vocabulary_alone_does_not_make_the_champion_incomparable():
    cfg = load_config()
    champion = _champion(3, 2, cfg)
    assert _incompatibility(cfg, champion, (2, 1)) is None  # the holdout has only ids it knows
    reason = _incompatibility(cfg, champion, (3, 1))
    assert reason and "not trained on" in reason
    assert "not trained on" in (_incompatibility(cfg, champion, (0, 2)) or "")


def test_gate_margin_is_the_gate_metric_difference():
    cfg = load_config(overrides={"gate.metric": "cvr_auc_type_avg"})
    assert gate_margin(cfg, METRICS, {"cvr_auc_type_avg": 0.70}) == pytest.approx(0.01)
    assert gate_margin(cfg, METRICS, {"cvr_auc_type_avg": None}) is None


def test_the_days_data_docs_page_is_self_contained(tmp_path):
    from validation.docs import write_day_page

    cfg = load_config(overrides={"paths.lake_root": str(tmp_path / "lake")})
    folder = cfg.paths.validation_dir("2024-05-01")
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "day": "2024-05-01", "success": False, "n_rows": 10, "engine": "pandas", "seconds": 1.0,
        "docs_pages": {"samples": "gx/validations/x.html"},
        "errors": [{"check": "row_count", "name": "expect_table_row_count_to_be_between",
                    "column": None, "observed": 10, "expected": ">= 100"}], "warnings": []}))
    page = write_day_page(cfg, "2024-05-01", tmp_path / "out")
    text = page.read_text()
    assert page.name == "dt=2024-05-01.html" and "row_count" in text and "FAILED" in text
    assert "href='gx/" not in text and "<link" not in text and "src=" not in text
    assert write_day_page(cfg, "2024-05-09", tmp_path / "out") is None


def test_bars_show_conversions_and_the_champion():
    import matplotlib.pyplot as plt

    from serving.plots import axis_bars

    fig = axis_bars(METRICS, "type", ["a", "b"], {"cvr_auc_type/a": 0.6}, "champion v1")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "7" in texts and any("n/a" in t and "0 conv" in t for t in texts)
    assert "champion v1" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)


# ---------------------------------------------------------------- two days through MLflow


@pytest.fixture(scope="module")
def two_days(tmp_path_factory):
    """Day 1 (cold start) trained, evaluated, gated; then the vocabulary grows by a type that
    day 2's holdout does not hold, and day 2 is trained, evaluated against v1 and gated."""
    tmp = tmp_path_factory.mktemp("mlflow_view")
    cfg = load_config(overrides={
        "paths.raw_root": str(tmp / "raw"), "paths.lake_root": str(tmp / "lake"),
        "paths.truth_root": str(tmp / "truth"), "paths.reports_root": str(tmp / "reports"),
        "mlflow.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "mlflow.artifact_root": str(tmp / "art"),
        "features": SMALL_FEATURES, "model.embedding_dim": 4, "model.ctr_hidden": [16],
        "model.cvr_hidden": [16], "training.batch_size": 512, "training.shuffle_buffer": 2000,
        "training.read_batch_rows": 1000, "training.validation_fraction": 0.05,
        "training.eval_every_steps": 100, "training.checkpoint_every_steps": 1000,
        "gate.metric": "cvr_auc", "gate.floor": 0.0, "gate.min_delta": -1.0,
        "gate.domain_drop_tolerance": 1.0, "training.epochs": 1,
    })
    runs = {}
    write_days(cfg, [DAYS[0]], n_rows=3000, n_types=2, n_scenarios=2)
    for day in DAYS:
        if day == DAYS[1]:
            write_days(cfg, [day], n_rows=3000, n_types=2, n_scenarios=2, seed=1)
            write_vocabs(cfg, 3, 2)  # a new type, absent from day 2's rows
        write_raw_impressions(cfg, day, 5, 2, 2)
        run_id = train_day(cfg, day)
        evaluation = evaluate_day(cfg, day, run_id)
        summary = gate_day(cfg, day, run_id, evaluation)
        url = record_gate(cfg, summary)
        runs[day] = {"run_id": run_id, "evaluation": evaluation, "summary": summary, "url": url}
    return cfg, runs


def test_a_run_carries_a_handful_of_metrics_and_the_tables(two_days):
    cfg, runs = two_days
    client = MlflowClient(cfg.mlflow.tracking_uri)
    second = runs[DAYS[1]]
    run = client.get_run(second["run_id"])
    metrics = run.data.metrics
    assert {"auc_type", "auc_scenario", "auc_overall", "holdout/cvr_auc", "holdout/cvr_auc_type_avg"} <= set(metrics)
    assert {f"{CHAMPION_PREFIX}auc_overall", GATE_MARGIN} <= set(metrics)
    assert not [k for k in metrics if "cvr_auc_type/" in k or "n_conversions" in k and "/" in k[9:]]
    assert len(metrics) < 60, sorted(metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/per_domain.json", "evaluation/per_type.json", "evaluation/per_scenario.json",
            "evaluation/holdout_eval.json"} <= artifacts
    per_type = json.loads(Path(client.download_artifacts(run.info.run_id, "evaluation/per_type.json")).read_text())
    assert "champion_cvr_auc" in per_type["columns"] and "n_conversions" in per_type["columns"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/cvr_auc_per_type.png"}


def test_the_champion_is_scored_by_its_version_though_the_vocabulary_grew(two_days):
    _, runs = two_days
    evaluation = runs[DAYS[1]]["evaluation"]
    assert evaluation["champion_version"] == "1"
    assert evaluation["champion"] is not None, evaluation["champion_note"]
    assert evaluation["champion_note"] == "champion v1 scored on the same holdout"


def test_description_model_name_datasets_and_version_description(two_days):
    cfg, runs = two_days
    client = MlflowClient(cfg.mlflow.tracking_uri)
    for day in DAYS:
        info = runs[day]
        run = client.get_run(info["run_id"])
        note = run.data.tags["mlflow.note.content"]
        assert day in note and info["summary"]["decision"] in note and info["summary"]["reason"] in note
        name = run.data.tags["mlflow.runName"]
        assert name.startswith(f"mmn {day} · {info['summary']['decision']}") and "auc_overall 0." in name
        assert run.data.tags["model_uri"].startswith("models:/")
        model = client.get_logged_model(run.data.tags["model_uri"].split("/")[-1])
        assert model.name == logged_model_name("mmn") != "model"
        contexts = {d.dataset.name: i.value for d in run.inputs.dataset_inputs for i in d.tags
                    if i.key == "mlflow.data.context"}
        assert contexts[f"samples dt={day}"] == ("training+holdout" if day == DAYS[0] else "holdout")
        assert all(d.dataset.digest for d in run.inputs.dataset_inputs)
        version = client.get_model_version(cfg.mlflow.registered_model, info["summary"]["version"])
        assert "user_id" in version.description and note in version.description
        assert info["url"].endswith(f"/runs/{info['run_id']}")
    second = client.get_run(runs[DAYS[1]]["run_id"])
    contexts = {i.value for d in second.inputs.dataset_inputs for i in d.tags if i.key == "mlflow.data.context"}
    assert contexts == {"training", "holdout"}
