"""The MMN training objective: CTR loss + alpha * domain-reweighted CTCVR loss.

CVR is learned through p_ctcvr = p_ctr * p_cvr against the conversion label on ALL
impressions (the ESMM construction), which avoids the sample-selection bias of training
CVR on clicked rows only. With dynamic weighting each instance's CTCVR term is scaled by
N / N_c, N the mini-batch size and N_c the count of its (type, scenario) domain in that
same mini-batch, so every domain present contributes its mean loss with equal weight
and small domains are not drowned by large ones.

The weights are divided by K, the number of domains present in the batch, so they average
exactly 1 over the batch: the CTCVR term is then the mean over present domains of each
domain's mean loss. Without it the term is their *sum*, which at 21 x 17 domains makes the
CTCVR gradient ~200x the CTR one and alpha meaningless (measured: holdout CVR AUC 0.456
literal vs 0.475 normalized on the same data; docs/benchmarks.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from core.config import Model

PROB_EPS = 1e-7


class LossOutput(NamedTuple):
    total: torch.Tensor
    ctr: torch.Tensor
    ctcvr: torch.Tensor


def clamp_prob(p: torch.Tensor, eps: float = PROB_EPS) -> torch.Tensor:
    """Keep probabilities inside (0, 1) so log() stays finite in float32."""
    return p.clamp(eps, 1.0 - eps)


def bce(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row binary cross-entropy of clamped probabilities.

    Written out (not F.binary_cross_entropy) so that a NaN prediction yields a NaN loss the
    trainer reports with its step, instead of an opaque input-range error.
    """
    p = clamp_prob(p)
    return -(y * torch.log(p) + (1.0 - y) * torch.log1p(-p))


def domain_weights(type_id: torch.Tensor, scenario_id: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N / (K * N_c) per instance: N_c counted per (type, scenario) within this mini-batch,
    K the number of domains present in it (so the weights average 1; see module docstring)."""
    key = type_id.long() * (int(scenario_id.max()) + 1) + scenario_id.long()
    _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    n = type_id.shape[0]
    return n / (counts.numel() * counts[inverse].to(dtype))


def mmn_loss(
    p_ctr: torch.Tensor,
    p_cvr: torch.Tensor,
    click: torch.Tensor,
    conversion: torch.Tensor,
    type_id: torch.Tensor,
    scenario_id: torch.Tensor,
    *,
    alpha: float,
    dynamic_weight: bool,
    cvr_weight: float = 0.0,
) -> LossOutput:
    """BCE(p_ctr, click) + alpha * mean_i w_i * BCE(p_ctr * p_cvr, conversion)
    [+ cvr_weight * mean over clicked rows of BCE(p_cvr, conversion)].

    The optional direct term gives the CVR tower the gradient the CTCVR product damps by
    p_ctr (a few percent): on clicked rows the conversion label is exactly CVR's label.
    The CTCVR term still covers the entire space, so p_cvr stays defined on unclicked rows.
    """
    ctr = bce(p_ctr, click.to(p_ctr.dtype)).mean()
    per_row = bce(p_ctr * p_cvr, conversion.to(p_ctr.dtype))
    if dynamic_weight:
        per_row = per_row * domain_weights(type_id, scenario_id, per_row.dtype)
    ctcvr = per_row.mean()
    total = ctr + alpha * ctcvr
    if cvr_weight:
        clicked = click > 0
        # Mean over clicked rows, written as a masked sum so a batch without clicks adds 0.
        direct = (bce(p_cvr, conversion.to(p_cvr.dtype)) * clicked).sum() / clicked.sum().clamp(min=1)
        total = total + cvr_weight * direct
    return LossOutput(total=total, ctr=ctr, ctcvr=ctcvr)


def loss_from_config(model_cfg: Model, p_ctr: torch.Tensor, p_cvr: torch.Tensor,
                     batch: dict[str, torch.Tensor]) -> LossOutput:
    """mmn_loss with alpha / dynamic_weight from ``cfg.model`` and labels from a batch."""
    return mmn_loss(
        p_ctr, p_cvr, batch["click"], batch["conversion"], batch["type_id"], batch["scenario_id"],
        alpha=float(model_cfg.alpha), dynamic_weight=bool(model_cfg.dynamic_weight),
        cvr_weight=float(model_cfg.cvr_loss_weight),
    )
