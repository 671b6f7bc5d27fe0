"""DNN baseline: the MMN inputs and tower sizes, but one CVR tower shared by all domains.

The domain reaches this model only as two embedded input fields (type_id, scenario_id),
which isolates what MMN's per-domain parameter composition adds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmn.config import PipelineConfig
from training.layers import FeatureEmbedding, ProbabilityTower
from training.models.base import CVRModel
from training.models.zoo import register_model


class DNN(CVRModel):
    """Shared embedding (domain ids included) + CTR tower + a single CVR tower."""

    kind = "dnn"

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
            [*feature_cardinalities, n_types, n_scenarios], embedding_dim, field_names
        )
        self.ctr_tower = ProbabilityTower(self.embedding.output_dim, ctr_hidden)
        self.cvr_tower = ProbabilityTower(self.embedding.output_dim, cvr_hidden)

    @classmethod
    def from_config(cls, cfg: PipelineConfig, n_types: int, n_scenarios: int) -> DNN:
        names = [f.name for f in cfg.features] + [cfg.domains.type_field, cfg.domains.scenario_field]
        return cls(
            [f.cardinality for f in cfg.features],
            cfg.model.embedding_dim,
            cfg.model.ctr_hidden,
            cfg.model.cvr_hidden,
            n_types,
            n_scenarios,
            field_names=names,
        )

    def forward(self, features: torch.Tensor, type_id: torch.Tensor,
                scenario_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding(features, type_id, scenario_id)
        return self.ctr_tower(x), self.cvr_tower(x)


@register_model("dnn")
def _build_dnn(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> DNN:
    return DNN.from_config(cfg, n_types, n_scenarios)
