"""SSIM, scenario-shared instance modeling (Liu et al., KDD'25), as an optional training stage.

Why: a data-poor display scenario trains its CVR tower on few rows. SSIM learns, for every
instance and every *other* scenario s' of the same conversion type, whether the instance is
also worth training on in domain (t, s'). The selected ("shared") instances then add their
CTCVR loss in the target towers. The selection is learned once (search phase), saved, and
reused by any model: routing an instance to another domain is just
``forward(features, type_id, scenario_id=s')``, so every zoo model with per-domain routing
(MMN's composed towers, STAR, MMoE/PLE, DPG...) and the DNN (domain ids as inputs) can use it.

Search phase (:func:`search`): a selection network (an MLP over the instance's backbone
embedding, one head per target) is trained jointly with a backbone (MMN by default). For a
mini-batch of N rows with home domains d_i = (t_i, s_i) and eligible targets k in K_i
(the scenarios s' != s_i of type t_i; every domain != d_i with ``across_types``)::

    L = L_backbone(every row in its home domain)              (CTR + alpha * CTCVR, as trained)
      + alpha * beta / N * sum_i sum_{k in K_i} g_ik * w_i * BCE(p_ctr(x_i; k) * p_cvr(x_i; k), y_i)
      + lambda * w_bar / N * sum_i sum_{k in K_i} KL(Bern(rho) || Bern(sigmoid(z_ik)))

* ``g_ik = STE(ReLU(sigmoid(z_ik) - epsilon))``: forward the hard mask 1[sigmoid(z_ik) > epsilon],
  backward the straight-through gradient of ``ReLU(sigmoid(z) - epsilon)``, i.e.
  ``dg/dz = sigmoid'(z)`` for selected pairs and 0 otherwise (unselected pairs are moved by
  the mask term alone, so their target-tower forward is skipped: it would get no gradient).
* ``w_i = N / N_c(d_i)`` with ``model.dynamic_weight`` (the row's home weight, so a home
  domain sharing a fraction r of its rows adds r times its mean loss to the target), else 1;
  ``w_bar = mean_i w_i`` (= the number of domains in the batch; 1 without dynamic weights).
* Mask term, the KL(1 || G) of the method: with ``rho = target_share = 1`` (default) it is
  exactly ``-lambda * w_bar * (1/N) * sum_i sum_k log sigmoid(z_ik)``; it keeps the selection
  from collapsing to none (the shared loss alone only ever pushes gates down). ``w_bar`` puts
  it on the scale of the weighted shared loss, so lambda does not depend on how many domains
  a batch holds. With rho = 1 a pair's gradient is ``(1 - s) * (c * s - lambda)`` with
  ``s = sigmoid(z)``, ``c = alpha * beta * (w_i / w_bar) * BCE``: it settles at ``s = lambda / c``
  and stays selected while ``c < lambda / epsilon``. So a larger epsilon selects fewer, a
  larger lambda more, and rows of domains bigger than average (w_i < w_bar) are cheaper to
  share: sharing flows from data-rich to data-poor scenarios. With rho < 1 each gate is
  pulled towards rho (lambda then selects more only while rho > epsilon).

The search's final selector scores every eligible (instance, target) pair of the training
rows (validation slice and holdout excluded); ``shared = score > epsilon``. The pairs are
saved as Parquet with a manifest under ``<lake_root>/ssim/<set_id>/`` (:func:`load_shared_set`).

Reuse phase: ``training.trainer.train(..., shared_set=, share_ratio=)`` looks up each batch's
impression ids in the set and runs the selected pairs as extra rows routed to their target
domains, adding the same shared term (g = 1). ``share_ratio=None`` uses the search's own
selection (the ``shared`` flag); a ratio r takes, per target domain, the top
``floor(r * candidates)`` pairs by score. :func:`choose_ratio` picks r on the trainer's
validation slice. Without a set, or with no selected pair in a batch, a step is exactly the
plain one.

Impression ids are only unique within a day (docs/contracts.md), and batches carry no day:
a window whose days share an impression id is refused rather than silently mis-shared.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from core.config import ConfigError, Model, PipelineConfig
from training.data import BucketRange, SampleStream, batch_to_device
from training.layers import MLP, FeatureEmbedding
from training.losses import LossOutput, bce, domain_weights, loss_from_config
from training.metrics import metrics_from_predictions
from training.models import CVRModel, build_model, check_capacity, loss_config
from training.trainer import (
    DEFAULT_MAX_VAL_ROWS,
    TrainResult,
    make_optimizer,
    parameter_groups,
    resolve_device,
    slice_ranges,
    train,
    vocab_sizes,
)

log = logging.getLogger(__name__)

SSIM_DIR = "ssim"
PAIRS_FILE = "pairs.parquet"
MANIFEST_FILE = "manifest.json"
SELECTOR_INPUTS = ("detached", "shared")
PAIRS_SCHEMA = pa.schema([
    ("impression_id", pa.string()), ("day", pa.string()),
    ("type_id", pa.int32()), ("scenario_id", pa.int32()),  # the TARGET domain
    ("score", pa.float32()), ("shared", pa.bool_()),
])


# ----------------------------------------------------------------------------- config


SSIM_MODES = ("off", "search", "reuse")


@dataclass(frozen=True)
class SsimConfig:
    """SSIM settings; ``ssim_config(cfg)`` reads them from the config's ``ssim:`` section."""

    mode: str = "off"  # the daily DAG's default: off | search (then retrain) | reuse (latest set)
    epsilon: float = 0.5  # hard-mask threshold on sigmoid(logit)
    mask_weight: float = 0.05  # lambda of the KL(rho || G) mask term (see module docstring)
    target_share: float = 1.0  # rho; 1.0 makes the mask term -sum log sigmoid(logit)
    shared_loss_weight: float = 1.0  # beta, multiplies alpha * the shared CTCVR term
    across_types: bool = False  # targets: other scenarios of the same type (False) or any domain
    selector_hidden: tuple[int, ...] = (64,)
    selector_input: str = "detached"  # detached | shared (selector gradients reach the embedding)
    selector_lr: float = 0.05  # Adam, its own optimizer: the gates must settle within one search
    selector_ema: float = 0.9  # EMA decay of the selector weights used to score (0 = last step)
    epochs: int = 1  # search epochs over the training window
    ratio_grid: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)
    ratio_metric: str = "cvr_auc_domain_avg"  # validation metric choose_ratio maximizes

    def __post_init__(self) -> None:
        if self.mode not in SSIM_MODES:
            raise ConfigError(f"ssim.mode must be one of {SSIM_MODES}, got {self.mode!r}")
        if not 0.0 < self.epsilon < 1.0:
            raise ConfigError(f"ssim.epsilon must lie in (0, 1), got {self.epsilon}")
        if self.mask_weight < 0 or self.shared_loss_weight < 0:
            raise ConfigError("ssim.mask_weight and ssim.shared_loss_weight must be >= 0")
        if not 0.0 < self.target_share <= 1.0:
            raise ConfigError(f"ssim.target_share must lie in (0, 1], got {self.target_share}")
        if self.selector_input not in SELECTOR_INPUTS:
            raise ConfigError(f"ssim.selector_input must be one of {SELECTOR_INPUTS}")
        if self.selector_lr <= 0:
            raise ConfigError("ssim.selector_lr must be > 0")
        if not 0.0 <= self.selector_ema < 1.0:
            raise ConfigError("ssim.selector_ema must lie in [0, 1)")
        if self.epochs < 1:
            raise ConfigError("ssim.epochs must be >= 1")
        if not self.ratio_grid or any(not 0.0 <= r <= 1.0 for r in self.ratio_grid):
            raise ConfigError(f"ssim.ratio_grid needs ratios in [0, 1], got {self.ratio_grid}")


def ssim_config(cfg: PipelineConfig, overrides: Mapping[str, Any] | None = None) -> SsimConfig:
    """SsimConfig from ``cfg.raw["ssim"]`` (defaults for absent keys), plus ``overrides``."""
    values = {**dict(cfg.raw.get("ssim") or {}), **dict(overrides or {})}
    names = {f.name for f in dataclasses.fields(SsimConfig)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"section 'ssim' has unknown keys: {sorted(unknown)}")
    for key in ("selector_hidden", "ratio_grid"):
        if key in values:
            values[key] = tuple(values[key])
    return SsimConfig(**values)


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Targets:
    """Which domains an instance may be shared into; one selector head per target."""

    n_types: int
    n_scenarios: int
    across_types: bool

    @property
    def n_heads(self) -> int:
        return self.n_types * self.n_scenarios if self.across_types else self.n_scenarios

    def domains(self, type_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target (type, scenario) ids of every head for every row: two [B, H] tensors."""
        heads = torch.arange(self.n_heads, device=type_id.device)
        if self.across_types:
            t = (heads // self.n_scenarios).expand(type_id.shape[0], -1)
            return t, (heads % self.n_scenarios).expand_as(t)
        s = heads.expand(type_id.shape[0], -1)
        return type_id.long().unsqueeze(1).expand_as(s), s

    def eligible(self, type_id: torch.Tensor, scenario_id: torch.Tensor) -> torch.Tensor:
        """[B, H] bool: the target differs from the row's home domain."""
        t, s = self.domains(type_id)
        return (t != type_id.long().unsqueeze(1)) | (s != scenario_id.long().unsqueeze(1))


# ----------------------------------------------------------------------------- selection


def ste_gate(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """STE(ReLU(sigmoid(z) - eps)): forward exactly 1[sigmoid(z) > eps] (0/1), backward the
    gradient of ReLU(sigmoid(z) - eps), so the hard mask still trains the selector."""
    soft = torch.relu(torch.sigmoid(logits) - epsilon)
    hard = (soft > 0).to(soft.dtype)
    return hard + (soft - soft.detach())


def mask_kl(logits: torch.Tensor, target_share: float) -> torch.Tensor:
    """Elementwise KL(Bern(rho) || Bern(sigmoid(z))); rho = 1 gives -log sigmoid(z)."""
    rho = torch.full_like(logits, float(target_share))
    return (torch.xlogy(rho, rho) - rho * F.logsigmoid(logits)
            + torch.xlogy(1 - rho, 1 - rho) - (1 - rho) * F.logsigmoid(-logits))


class Selector(nn.Module):
    """The adaptive selection network: an MLP with one logit per target head."""

    def __init__(self, in_dim: int, hidden: Sequence[int], n_heads: int, epsilon: float) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, out_dim=n_heads)
        head = self.mlp.net[-1]
        # Start with every pair selected (sigmoid midway between epsilon and 1): the search
        # then prunes pairs whose target-tower loss is too high, with the loss as evidence.
        start = (1.0 + epsilon) / 2.0
        with torch.no_grad():
            head.weight.mul_(0.1)
            head.bias.fill_(math.log(start / (1.0 - start)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def shared_ctcvr_loss(p_ctr: torch.Tensor, p_cvr: torch.Tensor, conversion: torch.Tensor,
                      home_weight: torch.Tensor, n_batch: int, scale: float,
                      gate: torch.Tensor | None = None) -> torch.Tensor:
    """scale / N * sum over shared pairs of [g *] w_home * BCE(p_ctcvr in the target, y)."""
    per_pair = bce(p_ctr * p_cvr, conversion.to(p_ctr.dtype)) * home_weight
    if gate is not None:
        per_pair = per_pair * gate
    return per_pair.sum() * (scale / n_batch)


def _home_weight(loss_cfg: Model, b: dict[str, Any]) -> torch.Tensor:
    if loss_cfg.dynamic_weight:
        return domain_weights(b["type_id"], b["scenario_id"], b["click"].dtype)
    return torch.ones_like(b["click"])


def _with_extra_rows(b: dict[str, Any], rows: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's inputs followed by copies of ``rows`` routed to domains (t, s)."""
    return (torch.cat([b["features"], b["features"][rows]]),
            torch.cat([b["type_id"], t]), torch.cat([b["scenario_id"], s]))


class JointSearch:
    """One search step's objective (module docstring): backbone + shared term + mask term."""

    def __init__(self, backbone: CVRModel, selector: Selector, embedding: FeatureEmbedding,
                 targets: Targets, ssim: SsimConfig, loss_cfg: Model) -> None:
        self.backbone, self.selector, self.embedding = backbone, selector, embedding
        self.targets, self.ssim, self.loss_cfg = targets, ssim, loss_cfg

    def logits(self, b: dict[str, Any]) -> torch.Tensor:
        own = self.embedding is not getattr(self.backbone, "embedding", None)
        detach = self.ssim.selector_input == "detached" and not own
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            x = self.embedding(b["features"], b["type_id"], b["scenario_id"])
        return self.selector(x)

    def loss(self, b: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        n = int(b["click"].shape[0])
        logits = self.logits(b)
        eligible = self.targets.eligible(b["type_id"], b["scenario_id"])
        gate = ste_gate(logits, self.ssim.epsilon)
        rows, heads = (eligible & (gate.detach() > 0)).nonzero(as_tuple=True)
        tgt_t, tgt_s = self.targets.domains(b["type_id"])
        feats, t, s = _with_extra_rows(b, rows, tgt_t[rows, heads], tgt_s[rows, heads])
        p_ctr, p_cvr = self.backbone(feats, t, s)
        main = loss_from_config(self.loss_cfg, p_ctr[:n], p_cvr[:n], b)
        total = main.total
        auxiliary = getattr(self.backbone, "auxiliary_loss", None)
        if callable(auxiliary):
            total = total + auxiliary()
        scale = float(self.loss_cfg.alpha) * self.ssim.shared_loss_weight
        home_weight = _home_weight(self.loss_cfg, b)
        shared = shared_ctcvr_loss(p_ctr[n:], p_cvr[n:], b["conversion"][rows], home_weight[rows],
                                   n, scale, gate=gate[rows, heads])
        mask_scale = self.ssim.mask_weight * float(home_weight.mean()) / n
        mask = mask_kl(logits, self.ssim.target_share)[eligible].sum() * mask_scale
        stats = {"loss": float(main.total.detach()), "shared": float(shared.detach()),
                 "mask": float(mask.detach()),
                 "selected": float(rows.numel()) / max(1, int(eligible.sum()))}
        return total + shared + mask, stats


# ----------------------------------------------------------------------------- shared set


@dataclass(frozen=True)
class SharedSet:
    """A saved selection: one row per eligible (instance, target domain) pair of the window."""

    set_id: str
    path: Path
    manifest: dict[str, Any]
    pairs: pd.DataFrame  # PAIRS_SCHEMA columns, sorted by (day, impression_id, type, scenario)

    @property
    def chosen_ratio(self) -> float | None:
        """The ratio :func:`record_choice` stored (None: not chosen yet)."""
        value = self.manifest.get("chosen_ratio")
        return None if value is None else float(value)

    def selection(self, ratio: float | None = None) -> pd.DataFrame:
        """Selected pairs (impression_id, day, type_id, scenario_id, score), deterministic:
        ``ratio=None`` = the search's hard mask; else the top floor(ratio * n) pairs by score
        per target domain, ties broken by day then impression id."""
        cols = ["impression_id", "day", "type_id", "scenario_id", "score"]
        if ratio is None:
            return self.pairs.loc[self.pairs["shared"].to_numpy(), cols].reset_index(drop=True)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"share ratio must lie in [0, 1], got {ratio}")
        ranked = self.pairs.sort_values(["type_id", "scenario_id", "score", "day", "impression_id"],
                                        ascending=[True, True, False, True, True], kind="mergesort")
        groups = ranked.groupby(["type_id", "scenario_id"], sort=False)
        size = groups["score"].transform("size").to_numpy()
        keep = groups.cumcount().to_numpy() < np.floor(ratio * size + 1e-9)
        return ranked.loc[keep, cols].reset_index(drop=True)


def ssim_root(cfg: PipelineConfig) -> Path:
    return cfg.paths.lake_root / SSIM_DIR


def _domain_names(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> tuple[list[str], list[str]]:
    """Vocabulary names when the vocabularies cover the ids, else the ids as strings."""
    from core.vocab import load_vocab

    names = []
    for field, n in ((cfg.domains.type_field, n_types), (cfg.domains.scenario_field, n_scenarios)):
        try:
            values = load_vocab(cfg.paths.vocab_dir, field).values()
        except (FileNotFoundError, ValueError):
            values = []
        names.append(values if len(values) >= n else [str(i) for i in range(n)])
    return names[0], names[1]


def selection_stats(pairs: pd.DataFrame, types: Sequence[str], scenarios: Sequence[str],
                    ) -> dict[str, Any]:
    """Share of candidate pairs selected, overall and per target domain."""
    per_domain = pairs.groupby(["type_id", "scenario_id"], sort=True)["shared"].agg(["mean", "size"])
    return {
        "n_candidates": int(len(pairs)),
        "n_shared": int(pairs["shared"].sum()),
        "selection_ratio": float(pairs["shared"].mean()) if len(pairs) else 0.0,
        "selection_ratio_per_domain": {f"{types[t]}/{scenarios[s]}": float(row["mean"])
                                       for (t, s), row in per_domain.iterrows()},
        "candidates_per_domain": {f"{types[t]}/{scenarios[s]}": int(row["size"])
                                  for (t, s), row in per_domain.iterrows()},
    }


def save_shared_set(cfg: PipelineConfig, pairs: pd.DataFrame, manifest: dict[str, Any]) -> SharedSet:
    """Write pairs + manifest into a temp folder, then rename: readers never see half a set."""
    root = ssim_root(cfg)
    final = root / manifest["set_id"]
    if final.exists():
        raise FileExistsError(f"shared set {final} already exists")
    tmp = root / f".{manifest['set_id']}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    table = pa.Table.from_pandas(pairs, schema=PAIRS_SCHEMA, preserve_index=False)
    pq.write_table(table, tmp / PAIRS_FILE)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, final)
    return SharedSet(manifest["set_id"], final, manifest, pairs)


def list_shared_sets(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Manifests of the saved sets, oldest first."""
    root = ssim_root(cfg)
    found = [json.loads(p.read_text()) for p in sorted(root.glob(f"*/{MANIFEST_FILE}"))
             if not p.parent.name.startswith(".")] if root.is_dir() else []
    return sorted(found, key=lambda m: (m["created_at"], m["set_id"]))


def load_shared_set(cfg: PipelineConfig, set_id: str | None = None) -> SharedSet:
    """A saved set (None = the latest), exactly as saved (same pairs, same selection)."""
    if set_id is None:
        sets = list_shared_sets(cfg)
        if not sets:
            raise FileNotFoundError(f"no SSIM shared set under {ssim_root(cfg)}: run the search first")
        set_id = sets[-1]["set_id"]
    path = ssim_root(cfg) / set_id
    if not (path / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"no SSIM shared set {set_id!r} under {ssim_root(cfg)}")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    pairs = pq.read_table(path / PAIRS_FILE, schema=PAIRS_SCHEMA).to_pandas()
    return SharedSet(set_id, path, manifest, pairs)


def record_choice(cfg: PipelineConfig, set_id: str, ratio: float, table: pd.DataFrame,
                  metric: str, day: str | None = None) -> SharedSet:
    """Store the validation-chosen ratio (its table, the day it was chosen for) in the set's
    manifest, atomically."""
    shared = load_shared_set(cfg, set_id)
    manifest = {**shared.manifest, "chosen_ratio": float(ratio), "ratio_metric": metric,
                "chosen_for_day": day,
                "ratio_table": json.loads(table.reset_index().to_json(orient="records"))}
    tmp = shared.path / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, shared.path / MANIFEST_FILE)
    return dataclasses.replace(shared, manifest=manifest)


# ----------------------------------------------------------------------------- search


def _domain_counts(cfg: PipelineConfig, n_types: int | None, n_scenarios: int | None) -> tuple[int, int]:
    if n_types is None or n_scenarios is None:
        vt, vs = vocab_sizes(cfg)
        n_types, n_scenarios = n_types or vt, n_scenarios or vs
    check_capacity(cfg, n_types, n_scenarios)
    return int(n_types), int(n_scenarios)


def _search_steps(cfg: PipelineConfig, days: Sequence[str], ranges: tuple[BucketRange, ...],
                  joint: JointSearch, optimizers: Sequence[torch.optim.Optimizer],
                  ssim: SsimConfig, device: torch.device, max_steps: int | None,
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
                  ssim: SsimConfig, device: torch.device,
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
    ssim: SsimConfig | None = None,
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
    ssim = ssim or ssim_config(cfg)
    if num_threads is not None:
        torch.set_num_threads(max(1, int(num_threads)))
    device = resolve_device(cfg.training.device)
    n_types, n_scenarios = _domain_counts(cfg, n_types, n_scenarios)
    ranges = slice_ranges(cfg, list(train_days), split, holdout_fraction, max_val_rows).train
    joint, optimizers = _build_search(cfg, model_kind, n_types, n_scenarios, ssim, device)
    train_stats = _search_steps(cfg, train_days, ranges, joint, optimizers, ssim, device, max_steps)
    pairs = score_pairs(cfg, train_days, ranges, joint, device)
    types, scenarios = _domain_names(cfg, n_types, n_scenarios)
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


def _jsonable(ssim: SsimConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(ssim).items()}


def _active_mlflow() -> Any | None:
    """mlflow when a run is active. No import: a run can only be active once mlflow is."""
    mlflow = sys.modules.get("mlflow")
    return mlflow if mlflow is not None and mlflow.active_run() is not None else None


def _log_set_to_mlflow(shared: SharedSet) -> None:
    mlflow = _active_mlflow()
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


# ----------------------------------------------------------------------------- reuse


class SharedTraining:
    """The reuse phase inside the trainer: per-batch lookup of shared pairs and the loss
    with them (see ``training.trainer.train(shared_set=, share_ratio=)``)."""

    def __init__(self, shared_set: SharedSet, ratio: float | None, n_types: int, n_scenarios: int,
                 ssim: SsimConfig) -> None:
        selected = shared_set.selection(ratio).sort_values(
            ["impression_id", "type_id", "scenario_id"], kind="mergesort")
        if len(selected) and (selected["type_id"].max() >= n_types
                              or selected["scenario_id"].max() >= n_scenarios):
            raise ValueError(f"shared set {shared_set.set_id} targets domains beyond the model's "
                             f"{n_types} x {n_scenarios}")
        ids = selected["impression_id"].to_numpy(dtype=object)
        unique, starts, counts = np.unique(ids, return_index=True, return_counts=True)
        self.set_id, self.ratio, self.n_pairs = shared_set.set_id, ratio, len(selected)
        self._index = pd.Index(unique)
        self._starts, self._counts = starts, counts
        self._type = torch.from_numpy(selected["type_id"].to_numpy(np.int64))
        self._scenario = torch.from_numpy(selected["scenario_id"].to_numpy(np.int64))
        self.scale_beta = ssim.shared_loss_weight
        self.rows_added = 0  # shared rows trained on, summed over steps (for reporting)

    def fingerprint(self) -> dict[str, Any]:
        return {"set_id": self.set_id, "ratio": self.ratio}

    def pairs(self, impression_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(batch row, index into the selection) of every selected pair of these rows."""
        pos = self._index.get_indexer(list(impression_ids))
        hit = np.flatnonzero(pos >= 0)
        counts = self._counts[pos[hit]]
        rows = np.repeat(hit, counts)
        firsts = np.repeat(self._starts[pos[hit]] - (np.cumsum(counts) - counts), counts)
        return rows, firsts + np.arange(rows.size)

    def step_loss(self, net: nn.Module, b: dict[str, Any], loss_cfg: Model) -> LossOutput:
        """The step's loss: plain when the batch holds no shared pair; else one forward over
        the rows plus their shared copies, and the shared CTCVR term added to the total."""
        if "impression_id" not in b:
            raise ValueError("SSIM reuse needs batches with impression ids")
        rows, sel = self.pairs(b["impression_id"])
        if rows.size == 0:
            p_ctr, p_cvr = net(b["features"], b["type_id"], b["scenario_id"])
            return loss_from_config(loss_cfg, p_ctr, p_cvr, b)
        device = b["features"].device
        rows_t = torch.from_numpy(rows).to(device)
        sel_t = torch.from_numpy(sel)
        feats, t, s = _with_extra_rows(b, rows_t, self._type[sel_t].to(device),
                                       self._scenario[sel_t].to(device))
        n = int(b["click"].shape[0])
        p_ctr, p_cvr = net(feats, t, s)
        main = loss_from_config(loss_cfg, p_ctr[:n], p_cvr[:n], b)
        shared = shared_ctcvr_loss(p_ctr[n:], p_cvr[n:], b["conversion"][rows_t],
                                   _home_weight(loss_cfg, b)[rows_t], n,
                                   float(loss_cfg.alpha) * self.scale_beta)
        self.rows_added += int(rows.size)
        return main._replace(total=main.total + shared)


def shared_training(cfg: PipelineConfig, shared_set: SharedSet, ratio: float | None,
                    n_types: int, n_scenarios: int) -> SharedTraining:
    """What ``train()`` builds from its ``shared_set`` / ``share_ratio`` arguments."""
    return SharedTraining(shared_set, ratio, n_types, n_scenarios, ssim_config(cfg))


# ----------------------------------------------------------------------------- ratio choice


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
    return metrics_from_predictions(frame, *_domain_names(cfg, n_types, n_scenarios))


def ratio_sweep(
    cfg: PipelineConfig,
    train_days: Sequence[str],
    shared_set: SharedSet,
    grid: Sequence[float],
    *,
    model_kind: str | None = None,
    split: str | None = None,
    holdout_fraction: float | None = None,
    max_val_rows: int = DEFAULT_MAX_VAL_ROWS,
    **train_kwargs: Any,
) -> list[RatioRun]:
    """Train once per ratio (0 = plain training, no set) and score the validation slice."""
    days = list(train_days)
    ranges = slice_ranges(cfg, days, split, holdout_fraction, max_val_rows)
    if ranges.validation is None:
        raise ValueError("choosing a share ratio needs a validation slice "
                         "(training.validation_fraction > 0)")
    runs = []
    for ratio in grid:
        result = train(cfg, days, model_kind=model_kind, split=split,
                       holdout_fraction=holdout_fraction, max_val_rows=max_val_rows,
                       shared_set=shared_set if ratio > 0 else None,
                       share_ratio=float(ratio) if ratio > 0 else None, **train_kwargs)
        metrics = slice_metrics(cfg, result.model, days, ranges.validation, result.n_types,
                                result.n_scenarios)
        runs.append(RatioRun(float(ratio), result, metrics))
    return runs


def ratio_table(runs: Sequence[RatioRun], metric: str) -> pd.DataFrame:
    """One row per ratio: the chosen metric, headline CVR AUCs, shared rows used."""
    rows = [{"ratio": r.ratio, metric: r.metrics.get(metric), "cvr_auc": r.metrics.get("cvr_auc"),
             "cvr_auc_domain_avg": r.metrics.get("cvr_auc_domain_avg"),
             "shared_rows": r.result.shared_rows or 0, "steps": r.result.steps} for r in runs]
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
    **sweep_kwargs: Any,
) -> tuple[float, pd.DataFrame]:
    """The share ratio (from ``grid``, default ssim.ratio_grid) whose model scores best on
    the trainer's validation slice by ``metric`` (default ssim.ratio_metric), and the table."""
    ssim = ssim_config(cfg)
    metric = metric or ssim.ratio_metric
    runs = ratio_sweep(cfg, train_days, shared_set, grid or ssim.ratio_grid, **sweep_kwargs)
    ratio = best_ratio(runs, metric)
    table = ratio_table(runs, metric)
    table["chosen"] = table.index == ratio
    return ratio, table


# ----------------------------------------------------------------------------- for the DAG


def run_search_for_day(
    cfg: PipelineConfig,
    day: str,
    train_days: Sequence[str],
    model_kind: str,
    *,
    cold_start: bool = False,
    ssim: SsimConfig | None = None,
    num_threads: int | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Search on the day's training window, choose the ratio on validation, record it in the
    set's manifest, log to the active MLflow run; returns what train() needs to reuse it.
    ``cold_start`` (TrainingPlan.cold_start) searches / validates on the non-holdout buckets;
    ``max_steps`` caps the search only."""
    ssim = ssim or ssim_config(cfg)
    split = "train" if cold_start else None
    holdout = cfg.windows.cold_start_holdout_fraction if cold_start else None
    shared = search(cfg, train_days, model_kind=model_kind, ssim=ssim, split=split,
                    holdout_fraction=holdout, num_threads=num_threads, max_steps=max_steps)
    metric = ssim.ratio_metric
    ratio, table = choose_ratio(cfg, train_days, shared, ssim.ratio_grid, model_kind=model_kind,
                                split=split, holdout_fraction=holdout, metric=metric,
                                progress=False, num_threads=num_threads)
    shared = record_choice(cfg, shared.set_id, ratio, table, metric, day=day)
    mlflow = _active_mlflow()
    if mlflow is not None:
        mlflow.log_metric("ssim/chosen_ratio", ratio)
        mlflow.log_text(table.to_csv(), f"ssim/{shared.set_id}/ratio_table.csv")
        mlflow.set_tag("ssim.chosen_ratio", str(ratio))
    return {"day": day, "set_id": shared.set_id, "ratio": ratio, "path": str(shared.path),
            "model_kind": model_kind, "selection_ratio": shared.manifest["selection_ratio"],
            "ratio_metric": metric,
            "ratio_table": json.loads(table.reset_index().to_json(orient="records"))}
