"""The serving fast path shared by the models' ``predict_domain``: one request's rows, all of
one domain, in inference mode, without per-request module dispatch or parameter walks.

Per request a model runs a few dozen tiny tensor ops, each costing microseconds of
dispatch, so what matters for one record is how many ops run, not their flops
(docs/benchmarks.md, "Serving latency (issue 19, item 3)"). The functions here compute
exactly what the modules' ``forward`` computes (the same kernels on the same operands: the
embedding gather, ``F.linear``, ReLU, sigmoid) with fewer ops:

* the features and the two domain ids are joined, range-checked and offset in Python when the
  request is small (a list of lists from the serving layer, or a small tensor), so the
  embedding costs one tensor construction and one gather;
* the towers' ``nn.Linear`` layers are collected once and run with ``F.linear``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.layers import MLP, FeatureEmbedding, ProbabilityTower

# Up to this many rows the ids are checked and offset in Python (cheaper than 5+ tensor ops).
SMALL_REQUEST_ROWS = 16


def check_domain(model: Any, type_id: int, scenario_id: int) -> tuple[int, int]:
    """The domain as ints, range-checked as ``CVRModel.domain_tensors`` does."""
    t, s = int(type_id), int(scenario_id)
    if not 0 <= t < model.n_types:
        raise ValueError(f"type_id {type_id} outside the model's [0, {model.n_types})")
    if not 0 <= s < model.n_scenarios:
        raise ValueError(f"scenario_id {scenario_id} outside [0, {model.n_scenarios})")
    return t, s


def _rows(features: Any) -> list[list[int]] | None:
    """The request as a list of int rows when it is small enough for the Python path."""
    if isinstance(features, torch.Tensor):
        if features.numel() > SMALL_REQUEST_ROWS * 64 or features.is_floating_point():
            return None
        rows = features.tolist()
    elif isinstance(features, (list, tuple)):
        rows = list(features)
    else:
        return None
    if rows and not isinstance(rows[0], (list, tuple)):
        rows = [rows]
    if len(rows) > SMALL_REQUEST_ROWS or not all(type(v) is int for row in rows for v in row):
        return None
    return [list(row) for row in rows]


def embed_domain(model: Any, features: Any, t: int, s: int
                 ) -> tuple[list[list[int]] | None, torch.Tensor | None, torch.Tensor]:
    """(rows, feats, x) of one domain's request: x = the embedded rows [n, D], the same values
    as ``model.embedding(features, full(t), full(s))``, ids checked the same way; a small
    request comes back as ``rows`` (Python lists, feats None), a large one as ``feats``, the
    feature ids [n, F] as a long tensor (rows None)."""
    emb: FeatureEmbedding = model.embedding
    weight = emb.table.weight
    rows = _rows(features)
    if rows is not None:
        n_features = emb.n_fields - 2
        offsets = _offsets(emb)
        flat: list[int] = []
        for row in rows:
            if len(row) != n_features:
                raise ValueError(f"expected ids of shape [B, {emb.n_fields}] (features + domain ids), "
                                 f"got {(len(rows), len(row) + 2)}")
            full = [*row, t, s]
            for col, (value, limit) in enumerate(zip(full, emb.cardinalities, strict=True)):
                if not 0 <= value < limit:
                    raise ValueError(f"id {value} of field {emb.field_names[col]!r} is outside [0, {limit})")
            flat.extend(v + o for v, o in zip(full, offsets, strict=True))
        ids = torch.tensor(flat, dtype=torch.long, device=weight.device)
        return rows, None, F.embedding(ids, weight).view(len(rows), -1)
    feats = torch.as_tensor(features, dtype=torch.long, device=weight.device)
    if feats.dim() == 1:
        feats = feats.unsqueeze(0)
    n = feats.shape[0]
    domain = torch.tensor([[t, s]], dtype=torch.long, device=weight.device).expand(n, 2)
    return None, feats, emb(feats, domain[:, 0], domain[:, 1])


def _offsets(emb: FeatureEmbedding) -> list[int]:
    cached = emb.__dict__.get("_offsets_list")
    if cached is None:
        cached = [int(v) for v in emb.offsets]
        emb.__dict__["_offsets_list"] = cached
    return cached


def linears(tower: nn.Module) -> list[nn.Linear] | None:
    """The ``nn.Linear`` layers of a ReLU MLP tower (``ProbabilityTower`` or ``MLP``), in order;
    None when the tower has other layers (then the caller runs the module itself)."""
    mlp = tower.mlp if isinstance(tower, ProbabilityTower) else tower
    if not isinstance(mlp, MLP):
        return None
    layers = list(mlp.net)
    found = [m for m in layers if isinstance(m, nn.Linear)]
    others = [m for m in layers if not isinstance(m, (nn.Linear, nn.ReLU, nn.Dropout))]
    return None if others else found


def run_linears(h: torch.Tensor, layers: Sequence[nn.Linear]) -> torch.Tensor:
    """``MLP.forward`` in eval mode: Linear, ReLU, ..., Linear (dropout is the identity)."""
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        h = F.linear(h, layer.weight, layer.bias)
        if i < last:
            h = torch.relu(h)
    return h


def probability(x: torch.Tensor, tower: nn.Module, layers: Sequence[nn.Linear] | None) -> torch.Tensor:
    """``ProbabilityTower.forward(x)`` through its collected layers when it has them."""
    if layers is None:
        return tower(x)
    return torch.sigmoid(run_linears(x, layers)).squeeze(-1)
