"""Bootstrap intervals of the CVR AUC averages: they must cover a known answer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from training.stats import average_samples, batched_auc, intervals, seed_mean, stratified_resamples


def _frame(rng: np.random.Generator, shifts: dict[tuple[int, int], float], n: int = 600,
           cvr: float = 0.2) -> tuple[pd.DataFrame, dict[tuple[int, int], float]]:
    """Clicked rows per domain with scores ~ N(shift * y, 1): true AUC = Phi(shift / sqrt 2)."""
    parts, truth = [], {}
    for (t, s), shift in shifts.items():
        y = (rng.random(n) < cvr).astype(np.int8)
        parts.append(pd.DataFrame({"type_id": t, "scenario_id": s, "click": 1, "conversion": y,
                                   "p_cvr": rng.normal(shift * y, 1.0)}))
        truth[(t, s)] = float(norm.cdf(shift / math.sqrt(2.0)))
    return pd.concat(parts, ignore_index=True), truth


def test_batched_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    labels = (rng.random((5, 300)) < 0.3).astype(float)
    scores = np.round(rng.normal(labels, 1.0), 1)  # many ties
    expected = [roc_auc_score(labels[i], scores[i]) for i in range(5)]
    assert batched_auc(labels, scores) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(batched_auc(np.ones((1, 4)), np.arange(4.0)[None, :])[0])


def test_domain_average_interval_covers_the_true_average_at_its_level():
    shifts = {(0, 0): 0.5, (0, 1): 1.0, (1, 0): 1.5, (1, 1): 0.8}
    covered, trials = 0, 30
    for trial in range(trials):
        rng = np.random.default_rng(100 + trial)
        frame, truth = _frame(rng, shifts, n=400)
        res = stratified_resamples(frame, n_resamples=100, min_conversions=0, seed=trial)
        samples = average_samples(res, frame[frame["click"] > 0]["p_cvr"].to_numpy())
        ci = intervals({"m": samples}, None, 0.9)["m"]["domain_avg"]
        covered += ci.covers(float(np.mean(list(truth.values()))))
        assert ci.low < ci.estimate < ci.high
    assert covered / trials >= 0.7  # nominal 0.9; 30 trials leave room for chance


def test_paired_difference_is_tighter_and_centred_on_the_true_gap():
    rng = np.random.default_rng(7)
    frame, _ = _frame(rng, {(0, 0): 1.0, (1, 0): 1.0, (1, 1): 1.0}, n=1500)
    clicked = frame[frame["click"] > 0]
    good = clicked["p_cvr"].to_numpy()
    worse = good + rng.normal(0.0, 0.8, len(good))  # the same signal, blurred: strictly worse
    res = stratified_resamples(frame, n_resamples=200, min_conversions=0, seed=1)
    both = {"good": average_samples(res, good), "worse": average_samples(res, worse)}
    ci = intervals(both, "good", 0.95)
    gap = ci["worse"]["domain_avg_vs_ref"]
    assert gap.high < 0  # decidably worse
    separate = ci["worse"]["domain_avg"].high - ci["worse"]["domain_avg"].low
    assert gap.high - gap.low < separate


def test_observed_average_keeps_only_domains_with_enough_conversions_and_seeds_average():
    rng = np.random.default_rng(3)
    frame, _ = _frame(rng, {(0, 0): 1.0, (0, 1): 1.0}, n=400)
    frame.loc[(frame["scenario_id"] == 1) & (frame.index % 2 == 0), "conversion"] = 0
    res = stratified_resamples(frame, n_resamples=50, min_conversions=60, seed=0)
    conversions = [frame[(frame.type_id == 0) & (frame.scenario_id == s)].conversion.sum() for s in (0, 1)]
    assert res.groups["observed_domain_avg"] == [[i] for i in (0, 1) if conversions[i] >= 60]
    scores = frame["p_cvr"].to_numpy()
    one = average_samples(res, scores)
    mean = seed_mean([one, average_samples(res, scores + 0.0)])
    assert mean["domain_avg"][0] == pytest.approx(one["domain_avg"][0])
