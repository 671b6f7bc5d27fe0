"""The interface every CVR model implements, so trainer, evaluator and serving stay generic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from core.config import PipelineConfig
from core.contracts import model_fields
from training.layers import FeatureEmbedding, ProbabilityTower


def config_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """Constructor arguments every zoo model reads from the config: the hashed feature
    fields (the type and scenario ids are appended as two more fields) and the CTR tower."""
    return {
        "feature_cardinalities": [f.cardinality for f in cfg.features],
        "embedding_dim": cfg.model.embedding_dim,
        "ctr_hidden": cfg.model.ctr_hidden,
        "field_names": model_fields(cfg),
    }


class CVRModel(nn.Module):
    """Maps (features, type_id, scenario_id) to (p_ctr, p_cvr), each of shape [B].

    Subclasses implement ``forward``; ``predict_domain`` serves requests that all belong to
    one known domain. ``kind`` is the zoo name that rebuilds the model from the same config
    (``build_model`` sets it), and ``loss_overrides`` holds the ``cfg.model`` loss settings a
    kind pins whatever the config says (e.g. an ablation without dynamic weights).
    """

    kind: str = "abstract"

    def __init__(self, n_types: int, n_scenarios: int) -> None:
        super().__init__()
        self.loss_overrides: dict[str, Any] = {}
        self.training_overrides: dict[str, Any] = {}
        if n_types < 1 or n_scenarios < 1:
            raise ValueError(f"need >= 1 type and scenario, got {n_types} x {n_scenarios}")
        self.n_types = int(n_types)
        self.n_scenarios = int(n_scenarios)

    def build_shared_inputs(self, feature_cardinalities: Sequence[int], embedding_dim: int,
                            ctr_hidden: Sequence[int], field_names: Sequence[str] | None = None) -> int:
        """The parts all zoo models share, so comparisons isolate the CVR side: the embedding
        (features + type + scenario fields) and the CTR tower. Returns the embedding width."""
        self.embedding = FeatureEmbedding(
            [*feature_cardinalities, self.n_types, self.n_scenarios], embedding_dim,
            list(field_names) if field_names else None)
        self.ctr_tower = ProbabilityTower(self.embedding.output_dim, ctr_hidden)
        return self.embedding.output_dim

    def domain_parameters(self) -> list[nn.Parameter]:
        """Parameters that only some domains' rows train (e.g. MMN's per-type and per-scenario
        deltas); the optimizer can give them their own learning rate. None by default."""
        return []

    def sparse_capable_tables(self) -> list[nn.Embedding]:
        """Embedding tables whose gradient may be sparse (only the rows a batch gathers): large
        tables that only some rows touch and that no weight decay reaches. None by default."""
        return []

    def use_sparse_gradients(self, enabled: bool) -> None:
        """Switch :meth:`sparse_capable_tables` to sparse gradients (the trainer decides: the
        optimizer must take them, see ``training.trainer.sparse_gradients_allowed``)."""
        for table in self.sparse_capable_tables():
            table.sparse = enabled

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients are sparse now (their own optimizer group)."""
        return [t.weight for t in self.sparse_capable_tables() if t.sparse]

    @property
    def n_domain_param_sets(self) -> int:
        """Number of separately learned CVR parameter sets (1 for a single shared tower)."""
        return 1

    def forward(  # pragma: no cover - abstract
        self, features: torch.Tensor, type_id: torch.Tensor, scenario_id: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def domain_tensors(
        self, features: torch.Tensor, type_id: int, scenario_id: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate one domain and expand it to per-row id tensors on the model's device."""
        if not 0 <= int(type_id) < self.n_types:
            raise ValueError(f"type_id {type_id} outside the model's [0, {self.n_types})")
        if not 0 <= int(scenario_id) < self.n_scenarios:
            raise ValueError(f"scenario_id {scenario_id} outside [0, {self.n_scenarios})")
        device = next(self.parameters()).device
        features = torch.as_tensor(features, dtype=torch.long, device=device)
        if features.dim() == 1:
            features = features.unsqueeze(0)
        n = features.shape[0]
        t = torch.full((n,), int(type_id), dtype=torch.long, device=device)
        s = torch.full((n,), int(scenario_id), dtype=torch.long, device=device)
        return features, t, s

    @torch.no_grad()
    def predict_domain(
        self, features: torch.Tensor, type_id: int, scenario_id: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_ctr, p_cvr) for rows that all belong to domain (type_id, scenario_id)."""
        feats, t, s = self.domain_tensors(features, type_id, scenario_id)
        return self.forward(feats, t, s)
