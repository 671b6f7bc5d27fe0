"""SSIM's targets, selection network and losses: the STE gate, the KL mask term, the shared
CTCVR term, and one search step's joint objective (see the package docstring for the maths)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import Model, Ssim
from training.layers import MLP, FeatureEmbedding
from training.losses import bce, domain_weights, loss_from_config
from training.models import CVRModel


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


def home_weight(loss_cfg: Model, b: dict[str, Any]) -> torch.Tensor:
    if loss_cfg.dynamic_weight:
        return domain_weights(b["type_id"], b["scenario_id"], b["click"].dtype)
    return torch.ones_like(b["click"])


def with_extra_rows(b: dict[str, Any], rows: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's inputs followed by copies of ``rows`` routed to domains (t, s)."""
    return (torch.cat([b["features"], b["features"][rows]]),
            torch.cat([b["type_id"], t]), torch.cat([b["scenario_id"], s]))


class JointSearch:
    """One search step's objective (module docstring): backbone + shared term + mask term."""

    def __init__(self, backbone: CVRModel, selector: Selector, embedding: FeatureEmbedding,
                 targets: Targets, ssim: Ssim, loss_cfg: Model) -> None:
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
        feats, t, s = with_extra_rows(b, rows, tgt_t[rows, heads], tgt_s[rows, heads])
        p_ctr, p_cvr = self.backbone(feats, t, s)
        main = loss_from_config(self.loss_cfg, p_ctr[:n], p_cvr[:n], b)
        total = main.total
        auxiliary = getattr(self.backbone, "auxiliary_loss", None)
        if callable(auxiliary):
            total = total + auxiliary()
        scale = float(self.loss_cfg.alpha) * self.ssim.shared_loss_weight
        weights = home_weight(self.loss_cfg, b)
        shared = shared_ctcvr_loss(p_ctr[n:], p_cvr[n:], b["conversion"][rows], weights[rows],
                                   n, scale, gate=gate[rows, heads])
        mask_scale = self.ssim.mask_weight * float(weights.mean()) / n
        mask = mask_kl(logits, self.ssim.target_share)[eligible].sum() * mask_scale
        stats = {"loss": float(main.total.detach()), "shared": float(shared.detach()),
                 "mask": float(mask.detach()),
                 "selected": float(rows.numel()) / max(1, int(eligible.sum()))}
        return total + shared + mask, stats
