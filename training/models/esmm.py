"""ESMM (Ma et al., SIGIR'18): a shared embedding feeding a CTR tower and a CVR tower,
trained on the entire impression space through p_ctcvr = p_ctr * p_cvr.

The CTCVR objective is the shared loss every zoo model trains with (training.losses),
and the domain reaches ESMM only as two embedded input fields, so in this codebase ESMM
computes the same function class as the ``dnn`` baseline. It is kept as its own kind so
that comparison tables carry the paper's baseline name and stay stable if ``dnn``
changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmn.config import PipelineConfig
from training.layers import FeatureEmbedding, ProbabilityTower
from training.models.base import CVRModel
from training.models.zoo import register_model


class ESMM(CVRModel):
    """Shared embedding (type and scenario as fields) + CTR tower + one CVR tower."""

    kind = "esmm"

    def __init__(
        self,
        feature_cardinalities: Sequence[int],
        embedding_dim: int,
        ctr_hidden: Sequence[int],
        cvr_hidden: Sequence[int],
        n_types: int,
        n_scenarios: int,
        field_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(n_types, n_scenarios)
        self.embedding = FeatureEmbedding(
            [*feature_cardinalities, n_types, n_scenarios], embedding_dim, field_names)
        self.ctr_tower = ProbabilityTower(self.embedding.output_dim, ctr_hidden)
        self.cvr_tower = ProbabilityTower(self.embedding.output_dim, cvr_hidden)

    @classmethod
    def from_config(cls, cfg: PipelineConfig, n_types: int, n_scenarios: int) -> ESMM:
        names = [f.name for f in cfg.features] + [cfg.domains.type_field, cfg.domains.scenario_field]
        return cls([f.cardinality for f in cfg.features], cfg.model.embedding_dim,
                   cfg.model.ctr_hidden, cfg.model.cvr_hidden, n_types, n_scenarios, names)

    def forward(self, features: torch.Tensor, type_id: torch.Tensor,
                scenario_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding(features, type_id, scenario_id)
        return self.ctr_tower(x), self.cvr_tower(x)


@register_model("esmm")
def _build_esmm(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> ESMM:
    return ESMM.from_config(cfg, n_types, n_scenarios)
