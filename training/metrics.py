"""Offline evaluation: AUC (scikit-learn's) / logloss, overall and per domain, plus the oracle.

An AUC is only defined when both label classes are present; otherwise it is None (never
a fake 0.5), and averages skip undefined members. CVR metrics use clicked rows (the
population CVR is defined on); CTR and CTCVR metrics use all impressions. When the
generator's truth side file exists, the same metrics computed from the true
probabilities on the same rows (``oracle_*``) give the ceiling a model can reach.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from core.config import PipelineConfig
from core.contracts import OBSERVED_AVG
from training.data import SampleStream, batch_to_device

LOG_EPS = 1e-7


def auc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """ROC AUC by scikit-learn's ``roc_auc_score`` (exact, ties count one half); None if one class.

    scikit-learn's is the reference implementation everyone can check against; the None
    contract (never a fake 0.5, never sklearn's exception) and the input checks stay ours."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return None
    return float(roc_auc_score(y, s))


def logloss(labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray,
            eps: float = LOG_EPS) -> float | None:
    """Mean binary cross-entropy with clipped probabilities; None when there are no rows."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    if y.size == 0:
        return None
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def truth_path(cfg: PipelineConfig, day: str) -> Path:
    return cfg.paths.truth_file(day)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP / DataParallel wrappers


@torch.no_grad()
def predict_rows(
    model: nn.Module,
    cfg: PipelineConfig,
    days: Sequence[str],
    *,
    split: str | None = None,
    holdout_fraction: float | None = None,
    batch_size: int | None = None,
    with_truth: bool = True,
) -> pd.DataFrame:
    """Per-row predictions over ``days`` (eval mode, no shuffle).

    Columns: day, type_id, scenario_id, click, conversion, p_ctr, p_cvr, p_ctcvr and, when a
    day has a truth file, impression_id, oracle_p_click, oracle_p_conversion (NaN where
    the truth file lacks a row).
    """
    net = _unwrap(model)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    frames = []
    try:
        for day in days:
            truth = truth_path(cfg, day) if with_truth else None
            has_truth = truth is not None and truth.is_file()
            stream = SampleStream(
                cfg, [day], batch_size=batch_size or cfg.training.batch_size, shuffle=False,
                split=split, holdout_fraction=holdout_fraction, with_impression_id=has_truth,
            )
            frame = _predict_stream(net, stream, device)
            frame.insert(0, "day", day)
            if has_truth:
                frame = _attach_truth(frame, truth)
            frames.append(frame)
    finally:
        net.train(was_training)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _predict_stream(net: nn.Module, stream: SampleStream, device: torch.device) -> pd.DataFrame:
    cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                         ("type_id", "scenario_id", "click", "conversion",
                                          "p_ctr", "p_cvr")}
    ids: list[str] = []
    for batch in stream:
        moved = batch_to_device(batch, device)
        p_ctr, p_cvr = net(moved["features"], moved["type_id"], moved["scenario_id"])
        cols["type_id"].append(batch["type_id"].numpy().astype(np.int32))
        cols["scenario_id"].append(batch["scenario_id"].numpy().astype(np.int32))
        cols["click"].append(batch["click"].numpy().astype(np.int8))
        cols["conversion"].append(batch["conversion"].numpy().astype(np.int8))
        cols["p_ctr"].append(p_ctr.float().cpu().numpy())
        cols["p_cvr"].append(p_cvr.float().cpu().numpy())
        if "impression_id" in batch:
            ids.extend(batch["impression_id"])
    data = {k: (np.concatenate(v) if v else np.empty(0)) for k, v in cols.items()}
    frame = pd.DataFrame(data)
    frame["p_ctcvr"] = frame["p_ctr"] * frame["p_cvr"]
    if ids:
        frame.insert(0, "impression_id", ids)
    return frame


def _attach_truth(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    truth = pq.read_table(path, columns=["impression_id", "p_click", "p_conversion"]).to_pandas()
    truth = truth.drop_duplicates("impression_id").rename(
        columns={"p_click": "oracle_p_click", "p_conversion": "oracle_p_conversion"}
    )
    return frame.merge(truth, on="impression_id", how="left", validate="many_to_one")


def _names(ids: np.ndarray, vocab: Sequence[str], what: str) -> list[str]:
    if len(ids) and (ids.min() < 0 or ids.max() >= len(vocab)):
        raise ValueError(f"{what} id {int(ids.max())} is not in the given vocabulary "
                         f"of {len(vocab)} values")
    return [vocab[i] for i in ids]


def _cvr_group(frame: pd.DataFrame, score: str, prefix: str, types: Sequence[str],
               scenarios: Sequence[str], min_domain_conversions: int | None = None,
               ) -> dict[str, float | None]:
    """CVR AUC overall, per type, per scenario, per domain, and their averages; with
    ``min_domain_conversions`` also the well-observed per-domain average (OBSERVED_AVG)."""
    clicked = frame[frame["click"] > 0]
    y, p = clicked["conversion"].to_numpy(), clicked[score].to_numpy()
    out: dict[str, float | None] = {f"{prefix}cvr_auc": auc(y, p),
                                    f"{prefix}cvr_logloss": logloss(y, p)}
    for axis, vocab, key in (("type", types, "type_id"), ("scenario", scenarios, "scenario_id")):
        values = []
        for idx, rows in clicked.groupby(key, sort=True):
            value = auc(rows["conversion"].to_numpy(), rows[score].to_numpy())
            out[f"{prefix}cvr_auc_{axis}/{vocab[int(idx)]}"] = value
            values.append(value)
        out[f"{prefix}cvr_auc_{axis}_avg"] = _mean_defined(values)
    domain_values = []
    for (t, s), rows in clicked.groupby(["type_id", "scenario_id"], sort=True):
        value = auc(rows["conversion"].to_numpy(), rows[score].to_numpy())
        out[f"{prefix}cvr_auc_domain/{types[int(t)]}/{scenarios[int(s)]}"] = value
        domain_values.append(value)
    out[f"{prefix}cvr_auc_domain_avg"] = _mean_defined(domain_values)
    out[f"{prefix}n_domains_with_cvr_auc"] = float(sum(v is not None for v in domain_values))
    if min_domain_conversions is not None:
        observed = [value for (value, n) in zip(domain_values, _domain_conversions(clicked), strict=True)
                    if n >= min_domain_conversions]
        out[f"{prefix}{OBSERVED_AVG}"] = _mean_defined(observed)
        out[f"{prefix}n_observed_domains"] = float(sum(v is not None for v in observed))
    return out


def _domain_conversions(clicked: pd.DataFrame) -> list[int]:
    """Holdout conversions per (type, scenario), in the groupby order _cvr_group uses."""
    return [int(n) for n in clicked.groupby(["type_id", "scenario_id"], sort=True)["conversion"].sum()]


def _counts(frame: pd.DataFrame, types: Sequence[str], scenarios: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {
        "n_impressions": float(len(frame)),
        "n_clicks": float(frame["click"].sum()),
        "n_conversions": float(frame["conversion"].sum()),
        "n_domains": float(frame.groupby(["type_id", "scenario_id"]).ngroups),
    }
    sums = frame.groupby("type_id")[["click", "conversion"]].sum()
    for idx, row in sums.iterrows():
        out[f"n_clicks_type/{types[int(idx)]}"] = float(row["click"])
        out[f"n_conversions_type/{types[int(idx)]}"] = float(row["conversion"])
    sums = frame.groupby("scenario_id")[["click", "conversion"]].sum()
    for idx, row in sums.iterrows():
        out[f"n_clicks_scenario/{scenarios[int(idx)]}"] = float(row["click"])
        out[f"n_conversions_scenario/{scenarios[int(idx)]}"] = float(row["conversion"])
    sums = frame.groupby(["type_id", "scenario_id"])[["click", "conversion"]].agg(["sum", "size"])
    for (t, s), row in sums.iterrows():
        name = f"{types[int(t)]}/{scenarios[int(s)]}"
        out[f"n_impressions_domain/{name}"] = float(row[("click", "size")])
        out[f"n_clicks_domain/{name}"] = float(row[("click", "sum")])
        out[f"n_conversions_domain/{name}"] = float(row[("conversion", "sum")])
    return out


def metrics_from_predictions(
    predictions: pd.DataFrame, vocab_types: Sequence[str], vocab_scenarios: Sequence[str],
    min_domain_conversions: int | None = None,
) -> dict[str, float | None]:
    """All evaluation metrics from :func:`predict_rows` output (see module docstring);
    ``min_domain_conversions`` (cfg.evaluation's) adds the well-observed domain average."""
    frame = predictions
    _names(frame["type_id"].to_numpy(), vocab_types, "type")
    _names(frame["scenario_id"].to_numpy(), vocab_scenarios, "scenario")
    click, conv = frame["click"].to_numpy(), frame["conversion"].to_numpy()
    out: dict[str, float | None] = {
        "ctr_auc": auc(click, frame["p_ctr"].to_numpy()),
        "ctcvr_auc": auc(conv, frame["p_ctcvr"].to_numpy()),
        "ctr_logloss": logloss(click, frame["p_ctr"].to_numpy()),
        "ctcvr_logloss": logloss(conv, frame["p_ctcvr"].to_numpy()),
    }
    out.update(_counts(frame, vocab_types, vocab_scenarios))
    out.update(_cvr_group(frame, "p_cvr", "", vocab_types, vocab_scenarios, min_domain_conversions))
    if "oracle_p_conversion" in frame:
        out.update(_oracle_metrics(frame, vocab_types, vocab_scenarios, min_domain_conversions))
    return out


def _oracle_metrics(frame: pd.DataFrame, types: Sequence[str], scenarios: Sequence[str],
                    min_domain_conversions: int | None = None) -> dict[str, float | None]:
    known = frame[frame["oracle_p_conversion"].notna() & frame["oracle_p_click"].notna()]
    known = known.assign(oracle_p_ctcvr=known["oracle_p_click"] * known["oracle_p_conversion"])
    out: dict[str, float | None] = {
        "oracle_rows": float(len(known)),
        "oracle_ctr_auc": auc(known["click"].to_numpy(), known["oracle_p_click"].to_numpy()),
        "oracle_ctcvr_auc": auc(known["conversion"].to_numpy(), known["oracle_p_ctcvr"].to_numpy()),
    }
    out.update(_cvr_group(known, "oracle_p_conversion", "oracle_", types, scenarios,
                          min_domain_conversions))
    return out


def evaluate(
    model: nn.Module,
    cfg: PipelineConfig,
    days: Sequence[str],
    *,
    vocab_types: Sequence[str],
    vocab_scenarios: Sequence[str],
    split: str | None = None,
    holdout_fraction: float | None = None,
    batch_size: int | None = None,
) -> dict[str, float | None]:
    """Metrics of ``model`` on the samples of ``days`` (optionally one hash split of them)."""
    predictions = predict_rows(model, cfg, days, split=split, holdout_fraction=holdout_fraction,
                               batch_size=batch_size)
    if predictions.empty:
        raise ValueError(f"no rows to evaluate in days {list(days)} (split={split!r})")
    return metrics_from_predictions(predictions, vocab_types, vocab_scenarios,
                                    cfg.evaluation.min_domain_conversions)


def per_domain_table(
    predictions: pd.DataFrame, vocab_types: Sequence[str], vocab_scenarios: Sequence[str]
) -> pd.DataFrame:
    """One row per (type, scenario) present: counts, CVR AUC and, if known, oracle CVR AUC."""
    rows = []
    has_oracle = "oracle_p_conversion" in predictions
    for (t, s), group in predictions.groupby(["type_id", "scenario_id"], sort=True):
        clicked = group[group["click"] > 0]
        row = {
            "type_id": int(t), "scenario_id": int(s),
            "type": vocab_types[int(t)], "scenario": vocab_scenarios[int(s)],
            "n_impressions": len(group), "n_clicks": int(group["click"].sum()),
            "n_conversions": int(group["conversion"].sum()),
            "cvr_auc": auc(clicked["conversion"].to_numpy(), clicked["p_cvr"].to_numpy()),
            "mean_p_cvr": float(clicked["p_cvr"].mean()) if len(clicked) else None,
        }
        if has_oracle:
            known = clicked[clicked["oracle_p_conversion"].notna()]
            row["oracle_cvr_auc"] = auc(known["conversion"].to_numpy(),
                                        known["oracle_p_conversion"].to_numpy())
        rows.append(row)
    return pd.DataFrame(rows)


def loggable(metrics: Mapping[str, float | None]) -> dict[str, float]:
    """Drop undefined (None) metrics, e.g. before mlflow.log_metrics."""
    return {k: float(v) for k, v in metrics.items() if v is not None}


def gate_conversions(metrics: Mapping[str, float | None]) -> dict[str, int]:
    """Holdout conversions keyed by per-type / per-scenario AUC metric name (for the gate)."""
    out = {}
    for axis in ("type", "scenario"):
        prefix = f"n_conversions_{axis}/"
        for key, value in metrics.items():
            if key.startswith(prefix) and value is not None:
                out[f"cvr_auc_{axis}/{key[len(prefix):]}"] = int(value)
    return out
