"""DNN baseline: the MMN inputs and tower sizes, but one CVR tower shared by all domains.

The domain reaches this model only as two embedded input fields (type_id, scenario_id),
which isolates what MMN's per-domain parameter composition adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from core.config import PipelineConfig
from training.layers import ProbabilityTower
from training.models.base import CVRModel, config_inputs
from training.models.predict_path import check_domain, embed_domain, linears, probability
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
        self._towers: tuple[list[nn.Linear] | None, list[nn.Linear] | None] | None = None  # predict path

    @classmethod
    def from_config(cls, cfg: PipelineConfig, n_types: int, n_scenarios: int) -> DNN:
        return cls(**config_inputs(cfg), cvr_hidden=cfg.model.cvr_hidden, n_types=n_types, n_scenarios=n_scenarios)

    def forward(self, features: torch.Tensor, type_id: torch.Tensor,
                scenario_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding(features, type_id, scenario_id)
        return self.ctr_tower(x), self.cvr_tower(x)

    @torch.inference_mode()
    def predict_domain(self, features: torch.Tensor | list[list[int]], type_id: int,
                       scenario_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s values for rows of one domain, through the serving fast path of
        ``predict_path`` (the same one MMN serves with, so the two compare fairly)."""
        t, s = check_domain(self, type_id, scenario_id)
        _, _, x = embed_domain(self, features, t, s)
        if self._towers is None:
            self._towers = (linears(self.ctr_tower), linears(self.cvr_tower))
        return probability(x, self.ctr_tower, self._towers[0]), probability(x, self.cvr_tower, self._towers[1])

    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        self._towers = None
        return super()._apply(*args, **kwargs)


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
