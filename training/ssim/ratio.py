"""Choosing the share ratio: train once per ratio of the grid and keep the one whose model
scores best on the trainer's validation slice."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.config import PipelineConfig
from training.data import BucketRange, SampleStream, batch_to_device
from training.metrics import metrics_from_predictions
from training.options import TrainOptions
from training.ssim.reuse import shared_training
from training.ssim.store import SharedSet, domain_names
from training.trainer import TrainResult, slice_ranges, train


@dataclass
class RatioRun:
    """One ratio of the sweep: its trained model and its validation metrics."""

    ratio: float
    result: TrainResult
    metrics: dict[str, float | None]


@torch.no_grad()
def slice_metrics(cfg: PipelineConfig, model: nn.Module, days: Sequence[str],
                  ranges: tuple[BucketRange, ...], n_types: int, n_scenarios: int,
                  ) -> dict[str, float | None]:
    """Evaluation metrics (training.metrics) of ``model`` on the rows ``ranges`` keep."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("type_id", "scenario_id", "click",
                                                          "conversion", "p_ctr", "p_cvr")}
    stream = SampleStream(cfg, days, batch_size=cfg.training.batch_size * 4, shuffle=False,
                          ranges=ranges)
    for batch in stream:
        b = batch_to_device(batch, device)
        p_ctr, p_cvr = model(b["features"], b["type_id"], b["scenario_id"])
        for key, value in (("type_id", b["type_id"]), ("scenario_id", b["scenario_id"]),
                           ("click", b["click"]), ("conversion", b["conversion"]),
                           ("p_ctr", p_ctr), ("p_cvr", p_cvr)):
            parts[key].append(value.cpu().numpy())
    model.train(was_training)
    frame = pd.DataFrame({k: np.concatenate(v) for k, v in parts.items()})
    frame["p_ctcvr"] = frame["p_ctr"] * frame["p_cvr"]
    return metrics_from_predictions(frame, *domain_names(cfg, n_types, n_scenarios))


def ratio_sweep(
    cfg: PipelineConfig,
    train_days: Sequence[str],
    shared_set: SharedSet,
    grid: Sequence[float],
    options: TrainOptions | None = None,
) -> list[RatioRun]:
    """Train once per ratio (0 = plain training, no set) with ``options`` (its split, holdout
    and validation cap also define the validation slice) and score the validation slice."""
    opts = options or TrainOptions()
    days = list(train_days)
    ranges = slice_ranges(cfg, days, opts.split, opts.holdout_fraction, opts.max_val_rows)
    if ranges.validation is None:
        raise ValueError("choosing a share ratio needs a validation slice "
                         "(training.validation_fraction > 0)")
    runs = []
    for ratio in grid:
        hook = shared_training(cfg, shared_set, float(ratio)) if ratio > 0 else None
        result = train(cfg, days, dataclasses.replace(opts, step_loss=hook))
        metrics = slice_metrics(cfg, result.model, days, ranges.validation, result.n_types,
                                result.n_scenarios)
        runs.append(RatioRun(float(ratio), result, metrics))
    return runs


def ratio_table(runs: Sequence[RatioRun], metric: str) -> pd.DataFrame:
    """One row per ratio: the chosen metric, headline CVR AUCs, shared rows used."""
    rows = [{"ratio": r.ratio, metric: r.metrics.get(metric), "cvr_auc": r.metrics.get("cvr_auc"),
             "cvr_auc_domain_avg": r.metrics.get("cvr_auc_domain_avg"),
             "shared_rows": int(r.result.step_loss_stats.get("ssim_shared_rows", 0)), "steps": r.result.steps} for r in runs]
    return pd.DataFrame(rows).set_index("ratio")


def best_ratio(runs: Sequence[RatioRun], metric: str) -> float:
    """The ratio with the highest defined metric; ties go to the smaller ratio."""
    scored = [(r.metrics.get(metric), r.ratio) for r in runs]
    defined = [(v, r) for v, r in scored if v is not None and math.isfinite(v)]
    if not defined:
        raise ValueError(f"validation metric {metric!r} is undefined for every ratio")
    return max(defined, key=lambda vr: (vr[0], -vr[1]))[1]


def choose_ratio(
    cfg: PipelineConfig,
    train_days: Sequence[str],
    shared_set: SharedSet,
    grid: Sequence[float] | None = None,
    *,
    metric: str | None = None,
    options: TrainOptions | None = None,
) -> tuple[float, pd.DataFrame]:
    """The share ratio (from ``grid``, default ssim.ratio_grid) whose model scores best on
    the trainer's validation slice by ``metric`` (default ssim.ratio_metric), and the table."""
    metric = metric or cfg.ssim.ratio_metric
    runs = ratio_sweep(cfg, train_days, shared_set, grid or cfg.ssim.ratio_grid, options)
    ratio = best_ratio(runs, metric)
    table = ratio_table(runs, metric)
    table["chosen"] = table.index == ratio
    return ratio, table
