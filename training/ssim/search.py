"""SSIM's search phase: train the selector jointly with a backbone on the window's training
rows, score every eligible (instance, target) pair, save the set and log it to MLflow."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from core.config import PipelineConfig, Ssim
from training.data import BucketRange, SampleStream, batch_to_device
from training.layers import FeatureEmbedding
from training.models import build_model, check_capacity, loss_config
from training.options import DEFAULT_MAX_VAL_ROWS
from training.ssim.losses import JointSearch, Selector, Targets
from training.ssim.store import PAIRS_SCHEMA, SharedSet, domain_names, save_shared_set, selection_stats
from training.trainer import make_optimizer, parameter_groups, resolve_device, slice_ranges, vocab_sizes

log = logging.getLogger(__name__)


def _domain_counts(cfg: PipelineConfig, n_types: int | None, n_scenarios: int | None) -> tuple[int, int]:
    if n_types is None or n_scenarios is None:
        vt, vs = vocab_sizes(cfg)
        n_types, n_scenarios = n_types or vt, n_scenarios or vs
    check_capacity(cfg, n_types, n_scenarios)
    return int(n_types), int(n_scenarios)


def _search_steps(cfg: PipelineConfig, days: Sequence[str], ranges: tuple[BucketRange, ...],
                  joint: JointSearch, optimizers: Sequence[torch.optim.Optimizer],
                  ssim: Ssim, device: torch.device, max_steps: int | None,
                  ) -> dict[str, float]:
    """The joint training loop; returns the mean stats of the last epoch."""
    step, stats = 0, []
    ema = _selector_ema(joint.selector, ssim.selector_ema)
    for epoch in range(ssim.epochs):
        stats = []
        stream = SampleStream(cfg, days, shuffle=True, epoch=epoch, ranges=ranges)
        for batch in stream:
            loss, batch_stats = joint.loss(batch_to_device(batch, device))
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"non-finite SSIM search loss at step {step + 1}")
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            if ema is not None:
                ema.update_parameters(joint.selector)
            stats.append(batch_stats)
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        if max_steps is not None and step >= max_steps:
            break
    if step == 0:
        raise ValueError(f"no training rows in days {list(days)} for the SSIM search")
    if ema is not None:
        joint.selector.load_state_dict(ema.module.state_dict())
    return {"steps": float(step), **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]}}


def _selector_ema(selector: Selector, decay: float) -> AveragedModel | None:
    """EMA of the selector's weights. Why: under the ReLU-STE gate a pair whose target loss is
    too high is pushed below epsilon by the loss and back above it by the mask term, so the
    raw last step's mask flips with the step; the short-horizon average settles it."""
    if decay <= 0:
        return None
    return AveragedModel(selector, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@torch.no_grad()
def score_pairs(cfg: PipelineConfig, days: Sequence[str], ranges: tuple[BucketRange, ...],
                joint: JointSearch, device: torch.device) -> pd.DataFrame:
    """Every eligible (instance, target) pair of the training rows with the selector's score."""
    joint.backbone.eval()
    joint.selector.eval()
    frames = []
    for day in days:
        stream = SampleStream(cfg, [day], batch_size=cfg.training.batch_size * 4, shuffle=False,
                              ranges=ranges, with_impression_id=True)
        for batch in stream:
            b = batch_to_device(batch, device)
            scores = torch.sigmoid(joint.logits(b).float())
            rows, heads = joint.targets.eligible(b["type_id"], b["scenario_id"]).nonzero(as_tuple=True)
            tgt_t, tgt_s = joint.targets.domains(b["type_id"])
            score = scores[rows, heads].cpu().numpy()
            frames.append(pd.DataFrame({
                "impression_id": np.asarray(batch["impression_id"], dtype=object)[rows.cpu().numpy()],
                "day": day,
                "type_id": tgt_t[rows, heads].cpu().numpy().astype(np.int32),
                "scenario_id": tgt_s[rows, heads].cpu().numpy().astype(np.int32),
                "score": score.astype(np.float32),
                "shared": score > joint.ssim.epsilon,
            }))
    pairs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        {f.name: pd.Series(dtype=f.type.to_pandas_dtype()) for f in PAIRS_SCHEMA})
    _check_ids_unique_across_days(pairs)
    return pairs.sort_values(["day", "impression_id", "type_id", "scenario_id"],
                             kind="mergesort").reset_index(drop=True)


def _check_ids_unique_across_days(pairs: pd.DataFrame) -> None:
    days_per_id = pairs.drop_duplicates(["impression_id", "day"])["impression_id"]
    if days_per_id.duplicated().any():
        example = days_per_id[days_per_id.duplicated()].iloc[0]
        raise ValueError(f"impression id {example!r} occurs on several days of the window; "
                         "SSIM keys shared instances by impression id")


def _build_search(cfg: PipelineConfig, model_kind: str, n_types: int, n_scenarios: int,
                  ssim: Ssim, device: torch.device,
                  ) -> tuple[JointSearch, list[torch.optim.Optimizer]]:
    """Backbone + selector (reading the backbone's embedding when it has one), and their
    optimizers: the backbone's as configured, Adam at ssim.selector_lr for the selector."""
    torch.manual_seed(cfg.training.seed)
    backbone = build_model(cfg, n_types, n_scenarios, model_kind).to(device)
    embedding = getattr(backbone, "embedding", None)
    own = not isinstance(embedding, FeatureEmbedding)
    if own:  # a backbone without a FeatureEmbedding: the selector learns its own
        embedding = FeatureEmbedding.from_config(cfg, n_types, n_scenarios).to(device)
    targets = Targets(n_types, n_scenarios, ssim.across_types)
    selector = Selector(embedding.output_dim, ssim.selector_hidden, targets.n_heads,
                        ssim.epsilon).to(device)
    joint = JointSearch(backbone, selector, embedding, targets, ssim, loss_config(cfg, backbone))
    selector_params = [*selector.parameters(), *(embedding.parameters() if own else ())]
    return joint, [make_optimizer(cfg, parameter_groups(cfg, backbone), device),
                   torch.optim.Adam(selector_params, lr=ssim.selector_lr)]


def search(
    cfg: PipelineConfig,
    train_days: Sequence[str],
    *,
    model_kind: str = "mmn",
    ssim: Ssim | None = None,
    split: str | None = None,
    holdout_fraction: float | None = None,
    n_types: int | None = None,
    n_scenarios: int | None = None,
    max_steps: int | None = None,
    max_val_rows: int = DEFAULT_MAX_VAL_ROWS,
    num_threads: int | None = None,
) -> SharedSet:
    """Search phase: train selector + backbone jointly on the window's training rows, score
    every eligible pair, save the set (and log it to the active MLflow run, if any).

    The rows are the ones :func:`training.trainer.train` trains on with the same ``split``
    and ``holdout_fraction`` (its validation slice and the holdout are left out)."""
    started = time.perf_counter()
    ssim = ssim or cfg.ssim
    if num_threads is not None:
        torch.set_num_threads(max(1, int(num_threads)))
    device = resolve_device(cfg.training.device)
    n_types, n_scenarios = _domain_counts(cfg, n_types, n_scenarios)
    ranges = slice_ranges(cfg, list(train_days), split, holdout_fraction, max_val_rows).train
    joint, optimizers = _build_search(cfg, model_kind, n_types, n_scenarios, ssim, device)
    train_stats = _search_steps(cfg, train_days, ranges, joint, optimizers, ssim, device, max_steps)
    pairs = score_pairs(cfg, train_days, ranges, joint, device)
    types, scenarios = domain_names(cfg, n_types, n_scenarios)
    created = dt.datetime.now(dt.UTC)
    manifest = {
        "set_id": f"{train_days[-1]}_{model_kind}_{created:%Y%m%dT%H%M%S%fZ}",
        "created_at": created.isoformat(), "days": list(train_days), "model_kind": model_kind,
        "split": split, "holdout_fraction": holdout_fraction,
        "n_types": n_types, "n_scenarios": n_scenarios, "config_hash": cfg.config_hash(),
        "epsilon": ssim.epsilon, "lambda": ssim.mask_weight, "ssim": _jsonable(ssim),
        "search": {**train_stats, "seconds": time.perf_counter() - started},
        **selection_stats(pairs, types, scenarios),
    }
    shared = save_shared_set(cfg, pairs, manifest)
    log.info("SSIM search %s: %d of %d pairs shared (%.1f%%) in %.1fs", shared.set_id,
             manifest["n_shared"], manifest["n_candidates"], 100 * manifest["selection_ratio"],
             manifest["search"]["seconds"])
    _log_set_to_mlflow(shared)
    return shared


def _jsonable(ssim: Ssim) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(ssim).items()}


def active_mlflow() -> Any | None:
    """mlflow when a run is active. No import: a run can only be active once mlflow is."""
    mlflow = sys.modules.get("mlflow")
    return mlflow if mlflow is not None and mlflow.active_run() is not None else None


def _log_set_to_mlflow(shared: SharedSet) -> None:
    mlflow = active_mlflow()
    if mlflow is None:
        return
    m = shared.manifest
    mlflow.log_artifacts(str(shared.path), artifact_path=f"ssim/{shared.set_id}")
    metrics = {"ssim/selection_ratio": m["selection_ratio"], "ssim/n_shared": m["n_shared"],
               "ssim/n_candidates": m["n_candidates"], "ssim/search_seconds": m["search"]["seconds"],
               "ssim/search_steps": m["search"]["steps"]}
    metrics.update({f"ssim/selection_ratio/{k}": v for k, v in m["selection_ratio_per_domain"].items()})
    mlflow.log_metrics(metrics)
    mlflow.set_tags({"ssim.set_id": shared.set_id, "ssim.epsilon": str(m["epsilon"]),
                     "ssim.lambda": str(m["lambda"])})
