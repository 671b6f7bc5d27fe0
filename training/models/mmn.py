"""MMN, the Masked Multi-domain Network (Ouyang et al., CIKM'23).

A shared embedding feeds a CTR tower and a CVR tower whose every layer (weights and
biases, output layer included) is composed per domain:
``theta(t, s) = theta_shared + theta_type[t] + theta_scenario[s]``, so N_t + N_s + 1
parameter sets serve N_t x N_s domains. Auto-masking routes each instance through its
own domain's composed tower only.

``forward_naive`` is the paper's literal formulation (every instance through all
N_t x N_s towers, multiplied by one-hot domain masks, summed): the reference.
``forward`` computes the same function exactly, using linearity of the composition:
``h @ W(t, s) = h @ (W_shared + W_type[t]) + h @ W_scenario[s]``; the first term is
composed once per type (N_t additions of a layer's weights) and both are grouped matmuls
over the rows of each present type / scenario (rows sorted by group once per forward, one
contiguous matmul per present group, see ``grouped.py``): two matmuls' flops per layer.
Tiny layers (the 1-unit output) multiply by every group's weights at once and select
with the one-hot mask.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import PipelineConfig
from training.models.base import CVRModel, config_inputs
from training.models.grouped import GroupPlan
from training.models.predict_path import check_domain, embed_domain, linears, probability
from training.models.zoo import register_model

DOMAIN_PARAMS = ("full", "common_only")
# Layers with in*out at most this use the dense one-hot path (G times the flops, no
# per-group dispatch); larger ones use grouped matmuls. With the configured towers only
# the 1-unit output layer qualifies.
DENSE_MAX_ELEMS = 1024

Layer = tuple[torch.Tensor, torch.Tensor]


def _nbytes(layers: Sequence[Layer]) -> int:
    return sum(w.nelement() * w.element_size() + b.nelement() * b.element_size() for w, b in layers)


class ComposedTower(nn.Module):
    """An MLP (ReLU, 1-unit logit output) whose parameters are composed per domain."""

    def __init__(self, dims: Sequence[int], n_types: int, n_scenarios: int,
                 domain_specific: bool = True) -> None:
        super().__init__()
        self.dims = [int(d) for d in dims]
        if len(self.dims) < 2 or self.dims[-1] != 1:
            raise ValueError(f"tower dims must run from input to a 1-unit output, got {dims}")
        self.n_types, self.n_scenarios = int(n_types), int(n_scenarios)
        self.domain_specific = domain_specific
        self.weight_shared, self.bias_shared = nn.ParameterList(), nn.ParameterList()
        self.weight_type, self.bias_type = nn.ParameterList(), nn.ParameterList()
        self.weight_scenario, self.bias_scenario = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(self.dims[:-1], self.dims[1:], strict=False):
            # nn.Linear's default init for the shared set; domain deltas start at zero so
            # training starts from the common network and each delta learns only from its
            # own domain's rows.
            bound = 1.0 / math.sqrt(fan_in)
            self.weight_shared.append(nn.Parameter(torch.empty(fan_in, fan_out).uniform_(-bound, bound)))
            self.bias_shared.append(nn.Parameter(torch.empty(fan_out).uniform_(-bound, bound)))
            if domain_specific:
                self.weight_type.append(nn.Parameter(torch.zeros(n_types, fan_in, fan_out)))
                self.bias_type.append(nn.Parameter(torch.zeros(n_types, fan_out)))
                self.weight_scenario.append(nn.Parameter(torch.zeros(n_scenarios, fan_in, fan_out)))
                self.bias_scenario.append(nn.Parameter(torch.zeros(n_scenarios, fan_out)))

    @property
    def n_layers(self) -> int:
        return len(self.dims) - 1

    def composed(self, type_id: int, scenario_id: int) -> list[Layer]:
        """theta(t, s) for every layer, differentiable (used by the naive reference)."""
        if not self.domain_specific:
            return list(zip(self.weight_shared, self.bias_shared, strict=True))
        return [
            (self.weight_shared[i] + self.weight_type[i][type_id] + self.weight_scenario[i][scenario_id],
             self.bias_shared[i] + self.bias_type[i][type_id] + self.bias_scenario[i][scenario_id])
            for i in range(self.n_layers)
        ]

    @staticmethod
    def run(x: torch.Tensor, layers: Sequence[Layer]) -> torch.Tensor:
        """Logits [B] of one fixed (composed) tower."""
        h = x
        for i, (weight, bias) in enumerate(layers):
            h = torch.addmm(bias, h, weight)
            if i < len(layers) - 1:
                h = torch.relu(h)
        return h.squeeze(-1)

    def forward(self, x: torch.Tensor, type_id: torch.Tensor, scenario_id: torch.Tensor) -> torch.Tensor:
        """Logits [B], each row through its own domain's tower (exact auto-masking)."""
        if not self.domain_specific:
            return self.run(x, list(zip(self.weight_shared, self.bias_shared, strict=True)))
        by_type = GroupPlan.build(type_id, self.n_types, x.dtype)
        by_scenario = GroupPlan.build(scenario_id, self.n_scenarios, x.dtype)
        h = x
        for i in range(self.n_layers):
            if self.dims[i] * self.dims[i + 1] <= DENSE_MAX_ELEMS:
                h = (torch.addmm(self.bias_shared[i], h, self.weight_shared[i])
                     + by_type.linear_dense(h, self.weight_type[i], self.bias_type[i])
                     + by_scenario.linear_dense(h, self.weight_scenario[i], self.bias_scenario[i]))
            else:
                # theta_shared + theta_type composed once per type (N_t small adds), so each
                # row pays two grouped matmuls instead of a shared one plus two grouped.
                weight = self.weight_shared[i].unsqueeze(0) + self.weight_type[i]
                bias = self.bias_shared[i].unsqueeze(0) + self.bias_type[i]
                h = (by_type.linear(h, weight, bias)
                     + by_scenario.linear(h, self.weight_scenario[i], self.bias_scenario[i]))
            if i < self.n_layers - 1:
                h = torch.relu(h)
        return h.squeeze(-1)


class ComposedWide(nn.Module):
    """A linear term over the one-hot feature ids, composed per domain like the towers:
    ``w(t, s)[f, id] = w_shared[f, id] + w_type[t][f, id] + w_scenario[s][f, id]``.

    It is logistic regression with type x field and scenario x field crosses inside MMN:
    the per-domain effects of single field values reach the CVR logit directly instead of
    through the deep tower, which the accuracy study measured as MMN's gap to a linear
    model with crosses (docs/benchmarks.md). One gather per parameter set; zero-initialised
    so training starts from the deep model alone.
    """

    def __init__(self, cardinalities: Sequence[int], n_types: int, n_scenarios: int,
                 fields: Sequence[int] | None = None) -> None:
        super().__init__()
        # The feature columns it covers (default: all): ids of high-cardinality fields may be
        # better left to the shared embeddings, which the CTR task trains on every impression.
        columns = list(range(len(cardinalities))) if fields is None else [int(f) for f in fields]
        if not columns or len(set(columns)) != len(columns):
            raise ValueError(f"wide fields must be distinct feature columns, got {fields}")
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long), persistent=False)
        self.all_columns = fields is None
        cards = [int(cardinalities[c]) for c in columns]
        self.total = sum(cards)
        offsets = torch.tensor([0] + cards[:-1], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.shared = nn.Embedding(self.total, 1)
        self.by_type = nn.Embedding(int(n_types) * self.total, 1)
        self.by_scenario = nn.Embedding(int(n_scenarios) * self.total, 1)
        for table in (self.shared, self.by_type, self.by_scenario):
            nn.init.zeros_(table.weight)

    def domain_parameters(self) -> list[nn.Parameter]:
        return [self.by_type.weight, self.by_scenario.weight]

    def domain_tables(self) -> list[nn.Embedding]:
        """The per-type and per-scenario tables: (N_t + N_s) x every id, of which a batch
        touches a few thousand rows, so a dense gradient and optimizer step over them cost
        more than the rest of MMN's step (docs/benchmarks.md, training speed)."""
        return [self.by_type, self.by_scenario]

    def forward(self, features: torch.Tensor, type_id: torch.Tensor, scenario_id: torch.Tensor) -> torch.Tensor:
        """The wide logit [B] of each row in its own domain (ids checked by the embedding)."""
        ids = (features if self.all_columns else features.index_select(1, self.columns)).long() + self.offsets
        return (self.shared(ids).sum(dim=(1, 2))
                + self.by_type(type_id.long().unsqueeze(1) * self.total + ids).sum(dim=(1, 2))
                + self.by_scenario(scenario_id.long().unsqueeze(1) * self.total + ids).sum(dim=(1, 2)))


class MMN(CVRModel):
    """Shared embedding + CTR tower + domain-composed CVR tower; outputs (p_ctr, p_cvr).

    With ``wide`` the CVR logit also gets :class:`ComposedWide`'s domain-composed linear term.
    """

    def __init__(
        self,
        feature_cardinalities: Sequence[int],
        embedding_dim: int,
        ctr_hidden: Sequence[int],
        cvr_hidden: Sequence[int],
        n_types: int,
        n_scenarios: int,
        domain_params: str = "full",
        field_names: Sequence[str] | None = None,
        wide: bool = False,
        wide_fields: Sequence[int] | None = None,
    ) -> None:
        super().__init__(n_types, n_scenarios)
        if domain_params not in DOMAIN_PARAMS:
            raise ValueError(f"domain_params must be one of {DOMAIN_PARAMS}, got {domain_params!r}")
        self.domain_params = domain_params
        self.kind = "mmn" if domain_params == "full" else "mmn_common_only"
        d_in = self.build_shared_inputs(feature_cardinalities, embedding_dim, ctr_hidden, field_names)
        self.cvr_tower = ComposedTower(
            [d_in, *cvr_hidden, 1], n_types, n_scenarios, domain_specific=domain_params == "full"
        )
        self.wide = ComposedWide(feature_cardinalities, n_types, n_scenarios, wide_fields) if wide else None
        # The serving cache of composed towers: LRU, bounded by bytes (None: every domain fits).
        self.predict_cache_bytes: int | None = None
        self._predict_cache: OrderedDict[tuple[int, int], list[Layer]] = OrderedDict()
        self._cache_nbytes = 0
        self.predict_cache_hits = self.predict_cache_misses = 0
        self._cache_versions: tuple[int, ...] | None = None
        self._cvr_params: list[nn.Parameter] | None = None
        self._ctr_layers: list[nn.Linear] | None = None
        self._wide_flat: tuple[torch.Tensor, list[tuple[int, int]], int, int] | None = None

    @classmethod
    def from_config(cls, cfg: PipelineConfig, n_types: int, n_scenarios: int,
                    domain_params: str | None = None, wide: bool | None = None) -> MMN:
        names = [f.name for f in cfg.features]
        wide_fields = [names.index(n) for n in cfg.model.wide_fields] or None
        return cls(**config_inputs(cfg), cvr_hidden=cfg.model.cvr_hidden, n_types=n_types, n_scenarios=n_scenarios,
                   domain_params=domain_params or cfg.model.domain_params,
                   wide=cfg.model.wide if wide is None else wide, wide_fields=wide_fields)

    def domain_parameters(self) -> list[nn.Parameter]:
        tower = self.cvr_tower
        wide = self.wide.domain_parameters() if self.wide is not None else []
        return [*tower.weight_type, *tower.bias_type, *tower.weight_scenario, *tower.bias_scenario, *wide]

    def sparse_capable_tables(self) -> list[nn.Embedding]:
        return self.wide.domain_tables() if self.wide is not None else []

    def _wide_logit(self, features: torch.Tensor, type_id: torch.Tensor,
                    scenario_id: torch.Tensor) -> torch.Tensor | float:
        return 0.0 if self.wide is None else self.wide(features, type_id, scenario_id)

    @property
    def n_domain_param_sets(self) -> int:
        return self.n_types + self.n_scenarios + 1 if self.domain_params == "full" else 1

    def _check_domains(self, type_id: torch.Tensor, scenario_id: torch.Tensor) -> None:
        # Ids are range-checked by the embedding; mismatched shapes would broadcast silently.
        if type_id.shape != scenario_id.shape or type_id.dim() != 1:
            raise ValueError("type_id and scenario_id must be 1-D tensors of equal length")

    def forward(self, features: torch.Tensor, type_id: torch.Tensor,
                scenario_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast exact auto-masking: (p_ctr, p_cvr), each [B]."""
        self._check_domains(type_id, scenario_id)
        type_id, scenario_id = type_id.long(), scenario_id.long()
        x = self.embedding(features, type_id, scenario_id)
        logit = self.cvr_tower(x, type_id, scenario_id) + self._wide_logit(features, type_id, scenario_id)
        return self.ctr_tower(x), torch.sigmoid(logit)

    def forward_naive(self, features: torch.Tensor, type_id: torch.Tensor,
                      scenario_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference auto-masking: all N_t x N_s towers on every row, masked and summed."""
        self._check_domains(type_id, scenario_id)
        type_id, scenario_id = type_id.long(), scenario_id.long()
        x = self.embedding(features, type_id, scenario_id)
        p_cvr = x.new_zeros(x.shape[0])
        for t in range(self.n_types):
            for s in range(self.n_scenarios):
                mask = ((type_id == t) & (scenario_id == s)).to(x.dtype)
                tower = self.cvr_tower.composed(t, s)
                wide = self._wide_logit(features, torch.full_like(type_id, t), torch.full_like(scenario_id, s))
                p_cvr = p_cvr + torch.sigmoid(ComposedTower.run(x, tower) + wide) * mask
        return self.ctr_tower(x), p_cvr

    @torch.inference_mode()
    def predict_domain(self, features: torch.Tensor | list[list[int]], type_id: int,
                       scenario_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Serve one domain: only its tower runs, with composed weights cached (LRU, bounded by
        ``predict_cache_bytes``). The values of ``forward``'s rows of that domain; the serving
        fast path of ``predict_path`` (few tensor ops per request)."""
        t, s = check_domain(self, type_id, scenario_id)
        rows, feats, x = embed_domain(self, features, t, s)
        h = x
        layers = self._cached_tower(t, s)
        for i, (weight_t, bias) in enumerate(layers):  # nn.Linear's layout and kernel, as DNN
            h = F.linear(h, weight_t, bias)
            if i < len(layers) - 1:
                h = torch.relu(h)
        logit = h.squeeze(-1)
        if self.wide is not None:
            logit = logit + (self._wide_rows(rows, t, s) if rows is not None else
                             self.wide(feats, torch.full_like(feats[:, 0], t), torch.full_like(feats[:, 0], s)))
        if self._ctr_layers is None:
            self._ctr_layers = linears(self.ctr_tower)
        return probability(x, self.ctr_tower, self._ctr_layers), torch.sigmoid(logit)

    def _wide_rows(self, rows: list[list[int]], t: int, s: int) -> torch.Tensor:
        """``self.wide``'s logit of a small request (ids already range-checked) as one gather
        from a flat serving copy of its three tables and one sum (its forward: three gathers,
        three sums; equal to float rounding)."""
        if self._wide_flat is None:
            wide = self.wide
            self._wide_flat = (
                torch.cat([wide.shared.weight.detach().reshape(-1), wide.by_type.weight.detach().reshape(-1),
                           wide.by_scenario.weight.detach().reshape(-1)]),
                [(int(c), int(o)) for c, o in zip(wide.columns, wide.offsets, strict=True)],
                wide.total, (1 + self.n_types) * wide.total)
        flat, columns, total, scenario_base = self._wide_flat
        ids = [row[c] + o for row in rows for c, o in columns]
        by_type, by_scenario = (1 + t) * total, scenario_base + s * total
        index = torch.tensor([*ids, *[i + by_type for i in ids], *[i + by_scenario for i in ids]],
                             dtype=torch.long, device=flat.device)
        return flat.index_select(0, index).view(3, len(rows), -1).sum(dim=(0, 2))

    def set_predict_cache_budget(self, max_bytes: int | None) -> None:
        """Bound the composed-tower cache to ``max_bytes`` (None: no bound; 0: nothing cached,
        every request composes its tower); evicts least-recently-used towers to fit."""
        self.predict_cache_bytes = None if max_bytes is None else max(0, int(max_bytes))
        self._evict_to_budget()

    @property
    def predict_cache_nbytes(self) -> int:
        """Bytes the cached composed towers hold now."""
        return self._cache_nbytes

    def _evict_to_budget(self) -> None:
        budget = self.predict_cache_bytes
        while budget is not None and self._cache_nbytes > budget and self._predict_cache:
            _, layers = self._predict_cache.popitem(last=False)
            self._cache_nbytes -= _nbytes(layers)

    def _cached_tower(self, type_id: int, scenario_id: int) -> list[Layer]:
        """Composed (weight [out, in], bias) per layer of one domain, cached per domain (LRU
        within ``predict_cache_bytes``; a tower larger than the budget is composed, not kept)."""
        # Parameter version counters catch in-place updates (optimizer steps) that happen
        # without a train()/load_state_dict() call in between. The parameter list is kept
        # flat: walking Module.parameters() per request costs more than the tower itself.
        if self._cvr_params is None:
            wide = list(self.wide.parameters()) if self.wide is not None else []
            self._cvr_params = [*self.cvr_tower.parameters(), *wide]
        versions = tuple(p._version for p in self._cvr_params)
        if versions != self._cache_versions:
            self._predict_cache.clear()
            self._cache_nbytes = 0
            self._wide_flat = None
            self._cache_versions = versions
        key = (type_id, scenario_id)
        layers = self._predict_cache.get(key)
        if layers is not None:
            self.predict_cache_hits += 1
            self._predict_cache.move_to_end(key)
            return layers
        self.predict_cache_misses += 1
        layers = [(w.detach().t().contiguous(), b.detach().clone())
                  for w, b in self.cvr_tower.composed(type_id, scenario_id)]
        size = _nbytes(layers)
        if self.predict_cache_bytes is None or size <= self.predict_cache_bytes:
            self._predict_cache[key] = layers
            self._cache_nbytes += size
            self._evict_to_budget()
        return layers

    def clear_predict_cache(self) -> None:
        self._predict_cache.clear()
        self._cache_nbytes = 0
        self._cache_versions = None
        self._cvr_params = None
        self._ctr_layers = None
        self._wide_flat = None

    def train(self, mode: bool = True) -> MMN:
        self.clear_predict_cache()
        return super().train(mode)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.clear_predict_cache()
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        self.clear_predict_cache()
        return super()._apply(*args, **kwargs)


@register_model("mmn")
def _build_mmn(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> MMN:
    """MMN with ``cfg.model.domain_params`` (full unless the config says common_only)."""
    return MMN.from_config(cfg, n_types, n_scenarios)


@register_model("mmn_no_dynamic_weight", loss_overrides={"dynamic_weight": False})
def _build_mmn_plain_loss(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> MMN:
    """Ablation: MMN trained with a plain-mean CTCVR loss (no N / N_c reweighting)."""
    return MMN.from_config(cfg, n_types, n_scenarios)


@register_model("mmn_common_only")
def _build_mmn_common(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> MMN:
    """Ablation: the CVR tower keeps theta_shared alone (no type / scenario deltas, no wide
    term's deltas either: its shared weights only would still be a per-field linear term)."""
    return MMN.from_config(cfg, n_types, n_scenarios, domain_params="common_only", wide=False)


# The MMN paper's configuration, whatever the pipeline's defaults become: CTR + CTCVR loss
# with the N / N_c dynamic weight and no direct CVR term, Adagrad at 0.01, and the domain
# deltas trained like every other parameter (docs/benchmarks.md measures its cost).
PAPER_LOSS = {"alpha": 1.0, "dynamic_weight": True, "cvr_loss_weight": 0.0}
PAPER_TRAINING = {"optimizer": "adagrad", "learning_rate": 0.01, "initial_accumulator": 0.0,
                  "domain_lr_scale": 1.0, "domain_weight_decay": 0.0, "shared_weight_decay": 0.0}


PAPER_TOWERS = (512, 256, 128, 128)  # CTR and CVR towers' hidden units


@register_model("mmn_paper", loss_overrides=PAPER_LOSS, training_overrides=PAPER_TRAINING)
def _build_mmn_paper(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> MMN:
    """MMN exactly as the paper builds and trains it: full domain parameter sets, its towers,
    no wide term."""
    inputs = {**config_inputs(cfg), "ctr_hidden": PAPER_TOWERS}
    return MMN(**inputs, cvr_hidden=PAPER_TOWERS, n_types=n_types, n_scenarios=n_scenarios,
               domain_params="full", wide=False)
