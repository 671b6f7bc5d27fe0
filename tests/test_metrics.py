"""Exact, tie-aware AUC; undefined AUCs are None; per-domain and oracle metrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from core.config import load_config
from simulation.synthetic import scenario_names, type_names, write_days
from training.metrics import (
    auc,
    evaluate,
    gate_conversions,
    loggable,
    logloss,
    metrics_from_predictions,
    per_domain_table,
    predict_rows,
)
from training.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def brute_force_auc(labels, scores) -> float:
    pos = [s for y, s in zip(labels, scores, strict=True) if y]
    neg = [s for y, s in zip(labels, scores, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 120))
    labels = rng.random(n) < 0.3
    labels[0], labels[1] = True, False
    scores = rng.integers(0, 5, n) / 4.0  # heavy ties
    assert auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_auc_edge_cases():
    assert auc([1, 0], [0.9, 0.1]) == 1.0
    assert auc([1, 0], [0.1, 0.9]) == 0.0
    assert auc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert auc([0, 0], [0.1, 0.2]) is None
    assert auc([], []) is None
    with pytest.raises(ValueError):
        auc([1, 0], [float("nan"), 0.1])


def test_auc_is_scikit_learns(monkeypatch):
    """One reference AUC (issue 18): the values come from sklearn's roc_auc_score, whose
    result is returned as a plain float; the one-class contract stays ours (None)."""
    import sklearn.metrics

    import training.metrics as metrics

    calls = []

    def spy(y, s):
        calls.append(len(y))
        return sklearn.metrics.roc_auc_score(y, s)

    monkeypatch.setattr(metrics, "roc_auc_score", spy, raising=False)
    value = metrics.auc([1, 0, 1, 0, 1], [0.9, 0.2, 0.4, 0.4, 0.1])
    assert calls == [5]
    assert type(value) is float and value == pytest.approx(brute_force_auc([1, 0, 1, 0, 1], [0.9, 0.2, 0.4, 0.4, 0.1]))
    assert metrics.auc([1, 1], [0.2, 0.3]) is None and calls == [5]


def test_logloss():
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert logloss([], []) is None
    assert math.isfinite(logloss([1], [0.0]))


def _predictions() -> pd.DataFrame:
    # domain (0,0): both classes among clicks; (0,1): clicks but no conversion -> AUC None;
    # (1,0): a perfectly ranked domain; (1,1): no clicks at all.
    rows = [
        (0, 0, 1, 1, 0.9, 0.8), (0, 0, 1, 0, 0.9, 0.3), (0, 0, 1, 1, 0.9, 0.2), (0, 0, 0, 0, 0.1, 0.5),
        (0, 1, 1, 0, 0.7, 0.4), (0, 1, 1, 0, 0.6, 0.1),
        (1, 0, 1, 1, 0.5, 0.9), (1, 0, 1, 0, 0.5, 0.1), (1, 0, 0, 0, 0.2, 0.6),
        (1, 1, 0, 0, 0.3, 0.5),
    ]
    frame = pd.DataFrame(rows, columns=["type_id", "scenario_id", "click", "conversion", "p_ctr", "p_cvr"])
    frame["p_ctcvr"] = frame["p_ctr"] * frame["p_cvr"]
    return frame


def test_per_domain_metrics_skip_undefined_domains():
    types, scenarios = ["app_install", "purchase"], ["feed", "search"]
    m = metrics_from_predictions(_predictions(), types, scenarios)
    assert m["cvr_auc_domain/app_install/feed"] == pytest.approx(0.5)
    assert m["cvr_auc_domain/app_install/search"] is None
    assert m["cvr_auc_domain/purchase/feed"] == 1.0
    assert "cvr_auc_domain/purchase/search" not in m  # no clicked rows: no CVR population
    assert m["cvr_auc_domain_avg"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["n_domains_with_cvr_auc"] == 2
    clicked = _predictions().query("click == 1")
    assert m["cvr_auc"] == pytest.approx(brute_force_auc(clicked["conversion"], clicked["p_cvr"]))
    type0 = clicked.query("type_id == 0")
    assert m["cvr_auc_type/app_install"] == pytest.approx(
        brute_force_auc(type0["conversion"], type0["p_cvr"]))
    assert m["cvr_auc_type_avg"] == pytest.approx(
        (m["cvr_auc_type/app_install"] + m["cvr_auc_type/purchase"]) / 2)
    assert m["cvr_auc_scenario/search"] is None
    assert m["cvr_auc_scenario_avg"] == m["cvr_auc_scenario/feed"]
    assert m["n_clicks_domain/app_install/feed"] == 3 and m["n_conversions_type/purchase"] == 1
    assert m["n_impressions"] == 10 and m["n_clicks"] == 7 and m["n_conversions"] == 3
    assert "oracle_cvr_auc" not in m
    assert all(v is not None for v in loggable(m).values())
    assert gate_conversions(m) == {"cvr_auc_type/app_install": 2, "cvr_auc_type/purchase": 1,
                                   "cvr_auc_scenario/feed": 3, "cvr_auc_scenario/search": 0}
    table = per_domain_table(_predictions(), types, scenarios)
    assert list(table["n_clicks"]) == [3, 2, 2, 0]
    assert table["cvr_auc"].isna().tolist() == [False, True, False, True]


def test_well_observed_average_keeps_domains_with_enough_conversions():
    types, scenarios = ["app_install", "purchase"], ["feed", "search"]
    # app_install/feed: 2 conversions, AUC 0.5; purchase/feed: 1 conversion, AUC 1.0.
    m = metrics_from_predictions(_predictions(), types, scenarios, min_domain_conversions=1)
    assert m["cvr_auc_domain_avg_observed"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["n_observed_domains"] == 2
    m = metrics_from_predictions(_predictions(), types, scenarios, min_domain_conversions=2)
    assert m["cvr_auc_domain_avg_observed"] == pytest.approx(0.5) and m["n_observed_domains"] == 1
    m = metrics_from_predictions(_predictions(), types, scenarios, min_domain_conversions=3)
    assert m["cvr_auc_domain_avg_observed"] is None and m["n_observed_domains"] == 0
    assert "cvr_auc_domain_avg_observed" not in metrics_from_predictions(_predictions(), types, scenarios)


def test_evaluate_with_oracle(tmp_path):
    cfg = load_config(overrides={"paths.lake_root": str(tmp_path / "lake"),
                                 "paths.truth_root": str(tmp_path / "truth"),
                                 "model.ctr_hidden": [8], "model.cvr_hidden": [8]})
    write_days(cfg, ["2024-03-01"], 3000, 3, 2)
    torch.manual_seed(0)
    model = build_model(cfg, 3, 2, "mmn")
    m = evaluate(model, cfg, ["2024-03-01"], vocab_types=type_names(3),
                 vocab_scenarios=scenario_names(2), split="holdout", holdout_fraction=0.3)
    assert 700 < m["n_impressions"] < 1100
    assert m["oracle_rows"] == m["n_impressions"]
    for key in ("ctr_auc", "cvr_auc", "ctcvr_auc", "ctr_logloss", "ctcvr_logloss",
                "cvr_auc_domain_avg", "oracle_cvr_auc", "oracle_cvr_auc_domain_avg",
                "oracle_cvr_auc_type_avg", "oracle_cvr_auc_scenario/scenario_1"):
        assert m[key] is not None, key
    assert m["oracle_cvr_auc"] > 0.7  # the synthetic signal is strong; the truth ranks well
    frame = predict_rows(model, cfg, ["2024-03-01"], split="holdout", holdout_fraction=0.3)
    assert len(frame) == m["n_impressions"] and frame["oracle_p_conversion"].notna().all()
    assert model.training  # evaluation restores the caller's mode
