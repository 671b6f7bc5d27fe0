"""Small composable layers shared by every CVR model (MMN and its baselines)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from core.config import PipelineConfig
from core.contracts import model_fields


def feature_cardinalities(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> list[int]:
    """Id-space size of every embedded field: configured features, then type and scenario.

    The two domain ids are embedded as ordinary fields so that every model, the DNN
    baseline included, sees the domain as an input feature.
    """
    return [f.cardinality for f in cfg.features] + [int(n_types), int(n_scenarios)]


class FeatureEmbedding(nn.Module):
    """One embedding table shared by all fields, each field owning a disjoint id range.

    A single table (with per-field offsets) makes the lookup one gather however many
    fields there are. Input ids are validated against their field's cardinality, because
    an out-of-range id would otherwise silently read a neighbouring field's rows.
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        dim: int,
        field_names: Sequence[str] | None = None,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if not cardinalities or min(cardinalities) < 1:
            raise ValueError(f"every field needs a cardinality >= 1, got {list(cardinalities)}")
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        self.cardinalities = [int(c) for c in cardinalities]
        self.field_names = list(field_names or [f"field_{i}" for i in range(len(cardinalities))])
        if len(self.field_names) != len(self.cardinalities):
            raise ValueError("field_names and cardinalities differ in length")
        self.dim = int(dim)
        offsets = torch.tensor([0] + self.cardinalities[:-1], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer(
            "limits", torch.tensor(self.cardinalities, dtype=torch.long), persistent=False
        )
        self.table = nn.Embedding(sum(self.cardinalities), self.dim)
        nn.init.normal_(self.table.weight, std=init_std)

    @property
    def n_fields(self) -> int:
        return len(self.cardinalities)

    @property
    def output_dim(self) -> int:
        return self.n_fields * self.dim

    @classmethod
    def from_config(cls, cfg: PipelineConfig, n_types: int, n_scenarios: int) -> FeatureEmbedding:
        names = model_fields(cfg)
        return cls(feature_cardinalities(cfg, n_types, n_scenarios), cfg.model.embedding_dim, names)

    def forward(
        self,
        features: torch.Tensor,
        type_id: torch.Tensor | None = None,
        scenario_id: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids [B, F] (plus type_id, scenario_id [B] when given) -> [B, n_fields * dim]."""
        ids = features.long()
        extra = [t.long().view(-1, 1) for t in (type_id, scenario_id) if t is not None]
        if extra:
            ids = torch.cat([ids, *extra], dim=1)
        if ids.dim() != 2 or ids.shape[1] != self.n_fields:
            raise ValueError(
                f"expected ids of shape [B, {self.n_fields}] (features + domain ids), "
                f"got {tuple(ids.shape)}"
            )
        self._check_range(ids)
        return self.table(ids + self.offsets).flatten(1)

    def _check_range(self, ids: torch.Tensor) -> None:
        bad = (ids < 0) | (ids >= self.limits)
        if bool(bad.any()):
            col = int(bad.any(dim=0).nonzero()[0, 0])
            value = int(ids[:, col][bad[:, col]][0])
            raise ValueError(
                f"id {value} of field {self.field_names[col]!r} is outside "
                f"[0, {self.cardinalities[col]})"
            )


class MLP(nn.Module):
    """Linear layers with an activation between them; ``out_dim`` adds a final linear head."""

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = int(in_dim)
        for width in hidden:
            layers += [nn.Linear(prev, int(width)), activation()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = int(width)
        if out_dim is not None:
            layers.append(nn.Linear(prev, int(out_dim)))
            prev = int(out_dim)
        self.net = nn.Sequential(*layers)
        self.output_dim = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ProbabilityTower(nn.Module):
    """MLP ending in one unit and a sigmoid: [B, in] -> probabilities [B]."""

    def __init__(self, in_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, out_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(x)).squeeze(-1)
