"""Bootstrap intervals for the CVR AUC averages, and paired ones for model differences.

Why a bootstrap: a per-domain AUC on a few dozen holdout conversions moves by several
hundredths between equally good models, so an average of them is only worth reading with
its interval. The holdout's clicked rows are resampled *within each (type, scenario)
domain* (a stratified bootstrap: every resample keeps each domain's size, so the set of
domains and their weights in the averages stay fixed), every average is recomputed on
each resample, and the percentile interval is reported. Differences between models are
*paired*: both models are scored on the same resampled rows, which cancels the shared
row-sampling noise and is far tighter than comparing two separate intervals. Several
seeds of one model are averaged per resample, so the interval is that of the seed mean.

AUCs come from ranks (Mann-Whitney, ties averaged, as scikit-learn's roc_auc_score), for
all resamples of a group at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import rankdata

# The averages a comparison reports, keyed as in the holdout metrics / table columns.
AVERAGES = ("type_avg", "scenario_avg", "domain_avg", "observed_domain_avg", "overall")


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval and standard error."""

    estimate: float
    low: float
    high: float
    se: float

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


def batched_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of every row of [B, n] label / score matrices; NaN where a row has one class."""
    ranks = rankdata(scores, axis=1)
    n = labels.shape[1]
    n_pos = labels.sum(axis=1)
    n_neg = n - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        value = ((ranks * labels).sum(axis=1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), value, np.nan)


@dataclass(frozen=True)
class Resamples:
    """Row indices of B stratified resamples of the clicked holdout rows, per domain, and
    which domains make up each average's groups."""

    labels: np.ndarray  # conversion of every clicked holdout row
    by_domain: list[np.ndarray]  # per domain: [B, n_d] indices into labels (the resamples)
    originals: list[np.ndarray]  # per domain: its rows, unresampled
    groups: dict[str, list[list[int]]]  # average -> its groups (lists of domain positions)

    @property
    def n_resamples(self) -> int:
        return self.by_domain[0].shape[0] if self.by_domain else 0


def stratified_resamples(frame: pd.DataFrame, n_resamples: int, min_conversions: int,
                         seed: int = 0) -> Resamples:
    """Resample the clicked rows of ``frame`` (predict_rows' columns) within each domain."""
    clicked = frame[frame["click"] > 0].reset_index(drop=True)
    labels = clicked["conversion"].to_numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    keys = list(clicked.groupby(["type_id", "scenario_id"], sort=True).indices.items())
    originals = [np.asarray(rows) for _, rows in keys]
    by_domain = [rows[rng.integers(0, len(rows), size=(n_resamples, len(rows)))] for rows in originals]
    domains = [k for k, _ in keys]
    positions = range(len(domains))
    observed = [i for i in positions if labels[originals[i]].sum() >= min_conversions]
    groups = {
        "type_avg": [[i for i in positions if domains[i][0] == t] for t in sorted({d[0] for d in domains})],
        "scenario_avg": [[i for i in positions if domains[i][1] == s]
                         for s in sorted({d[1] for d in domains})],
        "domain_avg": [[i] for i in positions],
        "observed_domain_avg": [[i] for i in observed],
        "overall": [list(positions)],
    }
    return Resamples(labels=labels, by_domain=by_domain, originals=originals, groups=groups)


def average_samples(res: Resamples, scores: np.ndarray) -> dict[str, tuple[float, np.ndarray]]:
    """Per average: (its value on the original rows, its value on each resample [B])."""
    out = {}
    for name, groups in res.groups.items():
        if not groups:
            out[name] = (float("nan"), np.full(res.n_resamples, np.nan))
            continue
        points, samples = [], []
        for members in groups:
            rows = np.concatenate([res.originals[i] for i in members])
            idx = np.concatenate([res.by_domain[i] for i in members], axis=1)
            points.append(batched_auc(res.labels[rows][None, :], scores[rows][None, :])[0])
            samples.append(batched_auc(res.labels[idx], scores[idx]))
        with _quiet():
            out[name] = (float(np.nanmean(points)), np.nanmean(np.vstack(samples), axis=0))
    return out


def interval(estimate: float, samples: np.ndarray, confidence: float) -> Interval:
    """Percentile interval of the resampled values around the original-sample estimate."""
    finite = samples[np.isfinite(samples)]
    if not np.isfinite(estimate) or finite.size < 2:
        return Interval(estimate, float("nan"), float("nan"), float("nan"))
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return Interval(estimate, float(low), float(high), float(finite.std(ddof=1)))


def seed_mean(per_seed: Sequence[dict[str, tuple[float, np.ndarray]]]) -> dict[str, tuple[float, np.ndarray]]:
    """The averages of several seeds of one model, averaged per resample (paired rows)."""
    out = {}
    for name in per_seed[0]:
        with _quiet():
            out[name] = (float(np.nanmean([s[name][0] for s in per_seed])),
                         np.nanmean(np.vstack([s[name][1] for s in per_seed]), axis=0))
    return out


def intervals(samples: Mapping[str, Mapping[str, tuple[float, np.ndarray]]], reference: str | None,
              confidence: float) -> dict[str, dict[str, Interval]]:
    """Per model and average: its interval and, for non-reference models, the paired
    interval of (model - reference) under the key ``<average>_vs_ref``."""
    out: dict[str, dict[str, Interval]] = {}
    for model, averages in samples.items():
        row = {name: interval(point, values, confidence) for name, (point, values) in averages.items()}
        if reference is not None and model != reference and reference in samples:
            for name, (point, values) in averages.items():
                ref_point, ref_values = samples[reference][name]
                row[f"{name}_vs_ref"] = interval(point - ref_point, values - ref_values, confidence)
        out[model] = row
    return out


@contextmanager
def _quiet() -> Iterator[None]:
    """nanmean over all-NaN columns is NaN by design here: silence its RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
