"""MT-FwFM, multi-task field-weighted factorization machines (Pan et al., "Predicting
different types of conversions with multi-task learning in online advertising", KDD'19).

Every conversion type t is a task sharing the feature embeddings v_i; the CVR logit of a
row of type t is

    b_t + sum_f <v_f, w_{t,f}> + sum_{f<g} r_{t,f,g} <v_f, v_g>

with type-specific field-pair interaction strengths r_t (an FwFM per type) and
type-specific field-weighted linear terms w_t (FwFM's "FeLV" linear term, which needs no
per-id weight table per type). The fields are the configured features plus the type and
scenario ids. Each row gathers its own type's r_t / w_t / b_t: exact routing at the cost
of one [B, pairs] product. The CTR side is a plain MLP tower on the same embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from core.config import PipelineConfig
from training.models.base import CVRModel, config_inputs
from training.models.zoo import register_model


class MTFwFM(CVRModel):
    """Shared embedding + CTR MLP tower + one FwFM per conversion type for CVR."""

    kind = "mt_fwfm"

    def __init__(
        self,
        feature_cardinalities: Sequence[int],
        embedding_dim: int,
        ctr_hidden: Sequence[int],
        n_types: int,
        n_scenarios: int,
        field_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(n_types, n_scenarios)
        self.build_shared_inputs(feature_cardinalities, embedding_dim, ctr_hidden, field_names)
        n_fields, dim = self.embedding.n_fields, self.embedding.dim
        rows, cols = torch.triu_indices(n_fields, n_fields, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        # r starts at 1 (plain FM interactions), linear vectors small, bias at zero.
        self.pair_weight = nn.Parameter(torch.ones(n_types, rows.numel()))
        self.linear_weight = nn.Parameter(torch.randn(n_types, n_fields * dim) * 0.01)
        self.type_bias = nn.Parameter(torch.zeros(n_types))

    @classmethod
    def from_config(cls, cfg: PipelineConfig, n_types: int, n_scenarios: int) -> MTFwFM:
        return cls(**config_inputs(cfg), n_types=n_types, n_scenarios=n_scenarios)

    @property
    def n_domain_param_sets(self) -> int:
        """One (r_t, w_t, b_t) set per conversion type."""
        return self.n_types

    def cvr_logit(self, x: torch.Tensor, type_id: torch.Tensor) -> torch.Tensor:
        """The type-specific FwFM logit [B] of embedded rows x [B, F * d]."""
        v = x.view(x.shape[0], self.embedding.n_fields, self.embedding.dim)
        dots = (v[:, self.pair_rows] * v[:, self.pair_cols]).sum(-1)  # [B, pairs]
        interactions = (dots * self.pair_weight[type_id]).sum(-1)
        linear = (x * self.linear_weight[type_id]).sum(-1)
        return self.type_bias[type_id] + linear + interactions

    def forward(self, features: torch.Tensor, type_id: torch.Tensor,
                scenario_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding(features, type_id, scenario_id)
        return self.ctr_tower(x), torch.sigmoid(self.cvr_logit(x, type_id.long()))


@register_model("mt_fwfm")
def _build_mt_fwfm(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> MTFwFM:
    return MTFwFM.from_config(cfg, n_types, n_scenarios)
