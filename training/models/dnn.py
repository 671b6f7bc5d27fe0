"""DNN baseline: the MMN inputs and tower sizes, but one CVR tower shared by all domains.

The domain reaches this model only as two embedded input fields (type_id, scenario_id),
which isolates what MMN's per-domain parameter composition adds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.config import PipelineConfig
from training.layers import ProbabilityTower
from training.models.base import CVRModel, config_inputs
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
        d_in = self.build_shared_inputs(feature_cardinalities, embedding_dim, ctr_hidden, field_names)
        self.cvr_tower = ProbabilityTower(d_in, cvr_hidden)

    @classmethod
    def from_config(cls, cfg: PipelineConfig, n_types: int, n_scenarios: int) -> DNN:
        return cls(**config_inputs(cfg), cvr_hidden=cfg.model.cvr_hidden, n_types=n_types, n_scenarios=n_scenarios)

    def forward(self, features: torch.Tensor, type_id: torch.Tensor,
                scenario_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding(features, type_id, scenario_id)
        return self.ctr_tower(x), self.cvr_tower(x)


@register_model("dnn")
def _build_dnn(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> DNN:
    return DNN.from_config(cfg, n_types, n_scenarios)


@register_model("esmm")
def _build_esmm(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> DNN:
    """ESMM (Ma et al., SIGIR'18): CTR and CVR towers on a shared embedding, trained on all
    impressions through p_ctcvr = p_ctr * p_cvr. That objective is the loss every zoo model
    trains with, and ESMM sees the domain only as input fields, so it is this same network;
    the kind keeps the paper's baseline name in comparison tables."""
    return DNN.from_config(cfg, n_types, n_scenarios)
