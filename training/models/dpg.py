"""DPG and MI-DPG (Cheng et al., "MI-DPG: Decomposable Parameter Generation Network Based
on Mutual Information for Multi-Scenario Recommendation", CIKM'23).

DPG: a CVR backbone MLP whose every layer weight W is modulated per domain by a weighting
matrix generated from the domain's input, ``W(d) = W (.) M(d)`` with ``M(d) = 1 + D(d)``
(so an all-zero D is the shared backbone). An auxiliary generator network reads the
"scenario-aware input" -- here the embeddings of the row's conversion type and display
scenario, i.e. the domain -- and produces D(d) in one of four forms (``variant``):

* ``full``   -- non-decomposed: D(d) generated entry by entry, [in, out];
* ``rowcol`` -- row- and column-specific: D(d) = U(d) V(d)^T, both generated (rank r);
* ``row``    -- row-specific, shared columns: D(d) = U(d) V^T, V a learned shared matrix;
* ``col``    -- column-specific, shared rows: D(d) = U V(d)^T, U shared.

The weighting depends on the domain only, so the generator runs once per domain present
in the batch, W(d) is composed for those P domains, and each domain's rows run one grouped
matmul (``grouped.py``). When P x in x out exceeds ``COMPOSE_MAX_ELEMS`` the low-rank forms
instead use ``h @ (W (.) U V^T) = sum_k ((h (.) u_k) @ W) (.) v_k`` (r + 1 batch matmuls,
no W(d) materialized); ``full`` always composes.

MI-DPG adds a mutual-information regularizer that pushes the weighting matrices to carry
domain information: a discriminator T scores (scenario input, weighting-matrix summary)
pairs against pairs whose scenario input is shuffled across the batch, giving the
Jensen-Shannon lower-bound estimate of Deep InfoMax / f-GAN. The auxiliary loss is
``-lambda * MI`` (gradient to the generator and embeddings only) plus the discriminator's
own objective ``-MI`` (gradient to the discriminator only); it is computed in forward, so
DDP sees every parameter used there, and handed to the trainer by ``auxiliary_loss()``.

Parameter sets: the domain-specific weights are generated, not stored; apart from the
domain-id embeddings every model has, DPG stores one shared set (n_domain_param_sets 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from core.config import PipelineConfig
from training.layers import MLP
from training.models.base import CVRModel, config_inputs
from training.models.grouped import GroupPlan
from training.models.mmoe import DENSE_MAX_ELEMS
from training.models.zoo import ModelFactory, register_model

VARIANTS = ("full", "rowcol", "row", "col")
COMPOSE_MAX_ELEMS = 1 << 24  # per layer: compose W(d) for the present domains up to this size
LOG_4 = math.log(4.0)


class DPGLayer(nn.Module):
    """A shared linear layer W, b whose weights each domain rescales by 1 + D(d)."""

    def __init__(self, fan_in: int, fan_out: int, cond_dim: int, variant: str, rank: int) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.fan_in, self.fan_out, self.variant, self.rank = fan_in, fan_out, variant, rank
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(fan_out).uniform_(-bound, bound))
        self.gen_full = nn.Linear(cond_dim, fan_in * fan_out) if variant == "full" else None
        self.gen_rows = nn.Linear(cond_dim, fan_in * rank) if variant in ("rowcol", "row") else None
        self.gen_cols = nn.Linear(cond_dim, fan_out * rank) if variant in ("rowcol", "col") else None
        scale = 1.0 / math.sqrt(rank)
        self.shared_rows = nn.Parameter(torch.randn(fan_in, rank) * scale) if variant == "col" else None
        self.shared_cols = nn.Parameter(torch.randn(fan_out, rank) * scale) if variant == "row" else None

    def factors(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) of D = U V^T per present domain: [P, in, r] or shared [in, r], and
        [P, out, r] or shared [out, r]. ``full`` returns (D [P, in, out], empty)."""
        p = cond.shape[0]
        if self.gen_full is not None:
            return self.gen_full(cond).view(p, self.fan_in, self.fan_out), cond.new_empty(0)
        rows = (self.gen_rows(cond).view(p, self.fan_in, self.rank) if self.gen_rows is not None
                else self.shared_rows)
        cols = (self.gen_cols(cond).view(p, self.fan_out, self.rank) if self.gen_cols is not None
                else self.shared_cols)
        return rows, cols  # type: ignore[return-value]

    def forward(self, h: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor],
                inverse: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
        """h [B, in] -> h @ (W (.) (1 + D(d_i))) + b, each row with its own domain's D.

        ``inverse`` [B] indexes each row's domain among the P present ones, and ``plan``
        groups the rows by it."""
        rows, cols = factors
        n_present = plan.onehot.shape[1]
        if self.gen_full is not None or n_present * self.fan_in * self.fan_out <= COMPOSE_MAX_ELEMS:
            weight = self.weight * (1.0 + self.delta(factors))  # [P, in, out]
            bias = self.bias.expand(weight.shape[0], -1)
            small = self.fan_in * self.fan_out <= DENSE_MAX_ELEMS
            return plan.linear_dense(h, weight, bias) if small else plan.linear(h, weight, bias)
        u = rows[inverse] if rows.dim() == 3 else rows.unsqueeze(0)  # [B or 1, in, r]
        v = cols[inverse] if cols.dim() == 3 else cols.unsqueeze(0)  # [B or 1, out, r]
        hu = h.unsqueeze(0) * u.permute(2, 0, 1)  # [r, B, in]
        modulated = (hu.reshape(-1, self.fan_in) @ self.weight).view(self.rank, h.shape[0], -1)
        return torch.addmm(self.bias, h, self.weight) + (modulated * v.permute(2, 0, 1)).sum(0)

    def delta(self, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """D per present domain, [P, in, out] (materialized)."""
        rows, cols = factors
        if self.gen_full is not None:
            return rows
        u = rows if rows.dim() == 3 else rows.unsqueeze(0)
        v = cols if cols.dim() == 3 else cols.unsqueeze(0)
        return u @ v.transpose(1, 2)

    def summary(self, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Row and column means of D per present domain, [P, in + out]: how strongly the
        domain rescales each input row and output column of W."""
        rows, cols = factors
        if self.gen_full is not None:
            return torch.cat([rows.mean(2), rows.mean(1)], dim=1)
        u = rows if rows.dim() == 3 else rows.unsqueeze(0)
        v = cols if cols.dim() == 3 else cols.unsqueeze(0)
        row_means = u @ v.mean(1).unsqueeze(-1)  # [P, in, 1]
        col_means = v @ u.mean(1).unsqueeze(-1)  # [P, out, 1]
        p = max(u.shape[0], v.shape[0])
        return torch.cat([row_means.squeeze(-1).expand(p, -1), col_means.squeeze(-1).expand(p, -1)], 1)


class DPG(CVRModel):
    """Shared embedding + CTR tower + CVR backbone with domain-generated weighting matrices."""

    kind = "dpg_rowcol"

    def __init__(
        self,
        feature_cardinalities: Sequence[int],
        embedding_dim: int,
        ctr_hidden: Sequence[int],
        cvr_hidden: Sequence[int],
        n_types: int,
        n_scenarios: int,
        variant: str = "rowcol",
        rank: int = 4,
        generator_hidden: int = 16,
        field_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(n_types, n_scenarios)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.variant = variant
        d_in = self.build_shared_inputs(feature_cardinalities, embedding_dim, ctr_hidden, field_names)
        self.cond_dim = 2 * self.embedding.dim
        self.generator = MLP(self.cond_dim, [generator_hidden])
        dims = [d_in, *(int(h) for h in cvr_hidden), 1]
        self.layers = nn.ModuleList(
            DPGLayer(a, b, generator_hidden, variant, rank) for a, b in zip(dims[:-1], dims[1:], strict=True))

    @classmethod
    def from_config(cls, cfg: PipelineConfig, n_types: int, n_scenarios: int,
                    **kwargs: object) -> DPG:
        """From ``cfg.model`` and ``cfg.zoo`` (MI-DPG's regularizer settings included)."""
        kwargs.setdefault("rank", cfg.zoo.dpg_rank)
        kwargs.setdefault("generator_hidden", cfg.zoo.dpg_generator_hidden)
        if issubclass(cls, MIDPG):
            kwargs.setdefault("mi_weight", cfg.zoo.mi_dpg_weight)
            kwargs.setdefault("discriminator_hidden", cfg.zoo.mi_dpg_discriminator_hidden)
            kwargs.setdefault("mi_rows", cfg.zoo.mi_dpg_rows)
        return cls(**config_inputs(cfg), cvr_hidden=cfg.model.cvr_hidden, n_types=n_types,
                   n_scenarios=n_scenarios, **kwargs)  # type: ignore[arg-type]

    def scenario_input(self, type_id: torch.Tensor, scenario_id: torch.Tensor) -> torch.Tensor:
        """The domain's input to the generator: [type embedding, scenario embedding]."""
        emb = self.embedding
        n = emb.n_fields
        ids = torch.stack([type_id.long() + emb.offsets[n - 2], scenario_id.long() + emb.offsets[n - 1]], 1)
        return emb.table(ids).flatten(1)

    def domain_factors(self, cond: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's generated weighting factors for scenario inputs ``cond`` [P, 2d]."""
        hidden = self.generator(cond)
        return [layer.factors(hidden) for layer in self.layers]

    def weight_summary(self, cond: torch.Tensor) -> torch.Tensor:
        """Flattened summary of every layer's weighting matrix for scenario inputs [P, 2d]."""
        return torch.cat([layer.summary(f) for layer, f in
                          zip(self.layers, self.domain_factors(cond), strict=True)], dim=1)

    def forward(self, features: torch.Tensor, type_id: torch.Tensor,
                scenario_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding(features, type_id, scenario_id)
        domain = type_id.long() * self.n_scenarios + scenario_id.long()
        present, inverse = torch.unique(domain, return_inverse=True)
        cond = self.scenario_input(present // self.n_scenarios, present % self.n_scenarios)
        factors = self.domain_factors(cond)
        plan = GroupPlan.build(inverse, present.numel(), x.dtype)
        h = x
        last = len(self.layers) - 1
        for i, (layer, f) in enumerate(zip(self.layers, factors, strict=True)):
            h = layer(h, f, inverse, plan)
            if i < last:
                h = torch.relu(h)
        self._after_forward(cond, factors, inverse)
        return self.ctr_tower(x), torch.sigmoid(h.squeeze(-1))

    def _after_forward(self, cond: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]],
                       inverse: torch.Tensor) -> None:
        """Hook for MI-DPG's regularizer; plain DPG has none."""


class MIDPG(DPG):
    """DPG + the mutual-information regularizer between scenario input and weighting matrix."""

    kind = "mi_dpg"

    def __init__(self, *args: object, mi_weight: float = 0.1,
                 discriminator_hidden: int = 32, mi_rows: int = 512,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if mi_weight < 0:
            raise ValueError(f"mi_weight must be >= 0, got {mi_weight}")
        self.mi_weight, self.mi_rows = float(mi_weight), int(mi_rows)
        summary_dim = sum(layer.fan_in + layer.fan_out for layer in self.layers)
        self.discriminator = MLP(self.cond_dim + summary_dim, [discriminator_hidden], out_dim=1)
        self._aux_loss: torch.Tensor | None = None
        self.last_mi: float | None = None

    def mi_estimate(self, cond: torch.Tensor, summary: torch.Tensor,
                    perm: torch.Tensor | None = None,
                    params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Jensen-Shannon MI estimate (Deep InfoMax), in [-inf, log 4]; ~0 when independent.

        Joint pairs (cond_i, summary_i) are scored against (cond_perm(i), summary_i) with
        ``perm`` a random permutation by default. ``params`` replaces the discriminator's
        parameters (torch.func.functional_call), e.g. detached ones for the generator's term.
        """
        if perm is None:
            perm = torch.randperm(cond.shape[0], device=cond.device)

        def score(c: torch.Tensor) -> torch.Tensor:
            pairs = torch.cat([c, summary], dim=1)
            if params is None:
                return self.discriminator(pairs).squeeze(-1)
            return torch.func.functional_call(self.discriminator, params, (pairs,)).squeeze(-1)

        return LOG_4 - F.softplus(-score(cond)).mean() - F.softplus(score(cond[perm])).mean()

    def _after_forward(self, cond: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]],
                       inverse: torch.Tensor) -> None:
        if not (self.training and torch.is_grad_enabled()) or inverse.numel() < 2:
            self._aux_loss = None
            return
        rows = inverse
        if rows.numel() > self.mi_rows:
            rows = rows[torch.randperm(rows.numel(), device=rows.device)[: self.mi_rows]]
        summary = torch.cat([layer.summary(f) for layer, f in zip(self.layers, factors, strict=True)], 1)
        a, b = cond[rows], summary[rows]
        perm = torch.randperm(a.shape[0], device=a.device)
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        mi_model = self.mi_estimate(a, b, perm, params=frozen)  # trains generator + embeddings
        mi_disc = self.mi_estimate(a.detach(), b.detach(), perm)  # trains the discriminator
        self.last_mi = float(mi_disc.detach())
        self._aux_loss = -self.mi_weight * mi_model - mi_disc

    def auxiliary_loss(self) -> torch.Tensor:
        """The regularizer of the last training forward (zero if there was none); the
        trainer adds it to the CTR + CTCVR loss."""
        loss, self._aux_loss = self._aux_loss, None
        if loss is None:
            return self.embedding.table.weight.new_zeros(())
        return loss


def _dpg_factory(variant: str) -> ModelFactory:
    def build(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> DPG:
        return DPG.from_config(cfg, n_types, n_scenarios, variant=variant)

    build.__doc__ = f"DPG with the {variant!r} weighting-matrix variant."
    return build


for _variant in VARIANTS:
    register_model(f"dpg_{_variant}")(_dpg_factory(_variant))


@register_model("mi_dpg")
def _build_mi_dpg(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> MIDPG:
    """MI-DPG: the row- and column-specific DPG plus the MI regularizer (zoo.mi_dpg_weight)."""
    return MIDPG.from_config(cfg, n_types, n_scenarios, variant="rowcol")  # type: ignore[return-value]
