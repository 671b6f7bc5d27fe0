"""mmn.compare: paper-style tables from real train_day / evaluate_day child runs."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from core.config import load_config
from mmn.compare import compare, comparison_table, domain_gain, main, to_markdown
from simulation.synthetic import scenario_names, type_names, write_days, write_raw_impressions

DAY = "2024-04-02"
N_TYPES, N_SCENARIOS = 2, 2
KINDS = ["mmn", "dnn", "mi_dpg", "lightgbm", "lr_crosses"]
PEERS = ["lightgbm", "lr_crosses"]
SMALL_FEATURES = [
    {"name": "user_id", "kind": "categorical", "buckets": 500},
    {"name": "ad_id", "kind": "categorical", "buckets": 200},
    {"name": "user_age", "kind": "numeric", "boundaries": [18, 25, 35, 45, 55, 65]},
]


def _overrides(tmp_path: Path) -> dict:
    return {
        "paths.raw_root": str(tmp_path / "raw"), "paths.lake_root": str(tmp_path / "lake"),
        "paths.truth_root": str(tmp_path / "truth"), "paths.reports_root": str(tmp_path / "reports"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow.artifact_root": str(tmp_path / "artifacts"),
        "features": SMALL_FEATURES, "model.embedding_dim": 4, "model.ctr_hidden": [16],
        "model.cvr_hidden": [16], "training.batch_size": 512, "training.shuffle_buffer": 2000,
        "training.read_batch_rows": 1000, "training.validation_fraction": 0.05,
        "training.eval_every_steps": 100, "training.checkpoint_every_steps": 1000,
    }


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compare")
    cfg = load_config(overrides=_overrides(tmp_path))
    # Cold start: only day D is built, so each model trains on D's non-holdout buckets.
    write_days(cfg, [DAY], n_rows=4000, n_types=N_TYPES, n_scenarios=N_SCENARIOS)
    write_raw_impressions(cfg, DAY, 8, N_TYPES, N_SCENARIOS)
    return cfg


@pytest.fixture(scope="module")
def result(data_cfg):
    return compare(data_cfg, DAY, KINDS)


def test_table_files_have_one_row_per_model(result):
    assert set(result.files) == {"markdown", "csv", "json", "heatmap"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in result.files.values())
    table = pd.read_csv(result.files["csv"], index_col="model")
    assert list(table.index) == [*KINDS, "oracle"]  # synthetic data carries true probabilities
    assert (table.loc["oracle", "overall"] > table.loc[KINDS, "overall"]).all()
    expected = ([f"type/{t}" for t in type_names(N_TYPES)] + ["type_avg"]
                + [f"scenario/{s}" for s in scenario_names(N_SCENARIOS)]
                + ["scenario_avg", "domain_avg", "observed_domain_avg", "overall", "n_params",
                   "n_domain_param_sets"])
    assert list(table.columns) == expected  # one seed: no _std columns
    assert table["type_avg"].between(0.3, 1.0).all()
    assert table.loc["mmn", "n_domain_param_sets"] == N_TYPES + N_SCENARIOS + 1
    assert table.loc["dnn", "n_domain_param_sets"] == table.loc["mi_dpg", "n_domain_param_sets"] == 1
    assert table.loc[PEERS, "n_params"].isna().all()  # peers are not networks
    lines = result.files["markdown"].read_text().splitlines()
    rows = [line for line in lines if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows[:len(KINDS)]] == [f"`{k}`" for k in KINDS]
    assert "±" not in result.files["markdown"].read_text()


def test_bootstrap_intervals_bracket_the_table_and_pair_against_the_reference(result):
    assert result.reference == "mmn"
    assert set(result.intervals) == {*KINDS, "oracle"}
    for kind in KINDS:
        for column in ("type_avg", "domain_avg", "overall"):
            iv = result.intervals[kind][column]
            assert iv.estimate == pytest.approx(result.table.loc[kind, column], abs=1e-9)
            assert iv.low <= iv.estimate <= iv.high
        if kind != "mmn":
            gap = result.intervals[kind]["overall_vs_ref"]
            expected = result.table.loc[kind, "overall"] - result.table.loc["mmn", "overall"]
            assert gap.estimate == pytest.approx(expected, abs=1e-9) and gap.low <= gap.high
    assert "Paired difference (model - `mmn`)" in result.markdown


def test_mlflow_parent_and_child_runs(result, data_cfg):
    client = MlflowClient(tracking_uri=data_cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(f"{data_cfg.mlflow.experiment}_comparison")
    assert experiment is not None and experiment.experiment_id == result.experiment_id
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["comparison_id"] == result.comparison_id
    assert "mmn/type_avg" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "comparison")}
    assert artifacts == {"comparison/comparison.md", "comparison/comparison.csv",
                         "comparison/comparison.json", "comparison/mmn_gain_over_dnn.png"}
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(r.data.tags["model_kind"] for r in children) == sorted(KINDS)
    for run in children:
        kind = run.data.tags["model_kind"]
        assert run.data.tags["comparison_id"] == result.comparison_id
        assert run.info.run_id == result.child_runs[kind][data_cfg.training.seed]
        keys = ["holdout/cvr_auc_type_avg", "holdout/cvr_auc"]
        keys += ["train/rows"] if kind in PEERS else ["model/n_params", "model/n_domain_param_sets"]
        for key in keys:
            assert key in run.data.metrics, key
    assert "mmn/overall_ci_low" in parent.data.metrics and "dnn/overall_minus_mmn" in parent.data.metrics


def test_table_with_several_seeds_reports_mean_and_std():
    """Two seeds: mean ± sample std per cell; the heatmap gain is paired by seed."""
    types, scenarios = ["a", "b"], ["x"]

    def m(v: float) -> dict:
        return {"cvr_auc_type/a": v, "cvr_auc_type/b": None, "cvr_auc_type_avg": v,
                "cvr_auc_scenario/x": v, "cvr_auc_scenario_avg": v, "cvr_auc_domain_avg": v,
                "cvr_auc": v, "cvr_auc_domain/a/x": v, "n_params": 10.0, "n_domain_param_sets": 1.0}

    metrics = {"mmn": {1: m(0.70), 2: m(0.74)}, "dnn": {1: m(0.69), 2: m(0.70)}}
    table = comparison_table(metrics, types, scenarios)
    assert table.loc["mmn", "type/a"] == pytest.approx(0.72)
    assert table.loc["mmn", "type/a_std"] == pytest.approx(0.0282843, rel=1e-5)
    assert math.isnan(table.loc["mmn", "type/b"])
    text = to_markdown(table, types, scenarios, "caption")
    assert "**0.7200 ± 0.0283**" in text and "n/a" in text
    grid = domain_gain(metrics, types, scenarios)
    assert grid[0, 0] == pytest.approx(0.025) and math.isnan(grid[1, 0])


def test_table_gets_an_oracle_row_when_true_probabilities_were_scored():
    types, scenarios = ["a"], ["x"]
    run = {"cvr_auc_type/a": 0.7, "cvr_auc_type_avg": 0.7, "cvr_auc_scenario/x": 0.7, "cvr_auc_scenario_avg": 0.7,
           "cvr_auc_domain_avg": 0.7, "cvr_auc": 0.7, "oracle_cvr_auc": 0.9, "oracle_cvr_auc_type/a": 0.9,
           "oracle_cvr_auc_type_avg": 0.9, "oracle_cvr_auc_scenario/x": 0.88, "oracle_cvr_auc_scenario_avg": 0.88,
           "oracle_cvr_auc_domain_avg": 0.87}
    table = comparison_table({"mmn": {1: run}, "dnn": {1: {**run, "cvr_auc_type/a": 0.6}}}, types, scenarios)
    assert table.loc["oracle", "type/a"] == pytest.approx(0.9)
    assert table.loc["oracle", "domain_avg"] == pytest.approx(0.87)
    text = to_markdown(table, types, scenarios, "caption")
    assert "| *oracle* | 0.9000 |" in text and "**0.7000**" in text  # the oracle is never "best"


def test_cli_and_argument_checks(data_cfg, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown model kinds"):
        compare(data_cfg, DAY, ["mmn", "nope"])
    with pytest.raises(ValueError, match="repeat"):
        compare(data_cfg, DAY, ["dnn", "dnn"])
    sets = [f"{k}={v}" for k, v in _overrides(tmp_path).items()
            if k.startswith(("model.", "training.", "features"))]
    sets += [f"paths.{k}={getattr(data_cfg.paths, k)}" for k in
             ("raw_root", "lake_root", "truth_root", "reports_root")]
    sets += [f"mlflow.tracking_uri={data_cfg.mlflow.tracking_uri}",
             f"mlflow.artifact_root={data_cfg.mlflow.artifact_root}"]
    argv = ["--day", DAY, "--kinds", "esmm", "--seeds", "5", "--experiment", "cli_comparison"]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| `esmm` |" in out and "seed 5" in out
    client = MlflowClient(tracking_uri=data_cfg.mlflow.tracking_uri)
    assert client.get_experiment_by_name("cli_comparison") is not None
