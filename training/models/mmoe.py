"""MMoE (Ma et al., KDD'18) as a multi-domain CVR baseline: one task per conversion type
(kind ``mmoe_type``) or per display scenario (kind ``mmoe_scen``).

Shared experts read the shared embedding (type and scenario included as fields); every
task owns a softmax gate over the experts and a CVR tower. Each instance belongs to
exactly one task, so only its task's gate row is gathered and only its task's tower runs
(grouped matmuls, as in MMN); every task is never evaluated on every row.

The small building blocks here (:class:`ExpertBank`, :class:`RoutedTower`,
:func:`routed_linear`, :func:`split_hidden`) are reused by PLE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from core.config import PipelineConfig
from training.models.base import CVRModel, config_inputs
from training.models.grouped import GroupPlan
from training.models.zoo import register_model

TASK_AXES = ("type", "scenario")
# Per-group layers with in*out at most this select weights by a one-hot matmul (G times
# the flops, no per-group dispatch); larger ones run one grouped matmul per present group.
DENSE_MAX_ELEMS = 1024


def split_hidden(cvr_hidden: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split ``cfg.model.cvr_hidden`` into (expert widths, task-tower widths).

    The first half (rounded up) of the CVR tower becomes the experts, the rest the task
    towers, so a mixture-of-experts model keeps the depth of the configured CVR tower:
    [512, 256, 128, 128] -> experts [512, 256], towers [128, 128]; [16] -> [16], [].
    """
    hidden = tuple(int(h) for h in cvr_hidden)
    if not hidden:
        raise ValueError("mixture-of-experts models need cfg.model.cvr_hidden with >= 1 layer")
    k = max(1, (len(hidden) + 1) // 2)
    return hidden[:k], hidden[k:]


def uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    """nn.Linear's default init, applied to stacked per-group / per-expert weights."""
    bound = 1.0 / math.sqrt(fan_in)
    return t.uniform_(-bound, bound)


def routed_linear(plan: GroupPlan, h: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
    """h_i @ W[g_i] + b[g_i] for W [G, in, out]: dense one-hot for tiny layers, else grouped."""
    if weight.shape[1] * weight.shape[2] <= DENSE_MAX_ELEMS:
        return plan.linear_dense(h, weight, bias)
    return plan.linear(h, weight, bias)


class ExpertBank(nn.Module):
    """``n`` independent ReLU MLPs evaluated together as batched matmuls.

    ``forward(x)`` with x [B, in] feeds the same input to every expert (one matmul for
    the first layer); x [n, B, in] gives each expert its own input (PLE's task experts).
    Output: [n, B, out].
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], n: int) -> None:
        super().__init__()
        if n < 1 or not hidden:
            raise ValueError(f"an expert bank needs >= 1 expert and layer, got {n}, {hidden}")
        self.n = int(n)
        dims = [int(in_dim), *(int(h) for h in hidden)]
        self.weight = nn.ParameterList(
            nn.Parameter(uniform_(torch.empty(n, a, b), a)) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.bias = nn.ParameterList(
            nn.Parameter(uniform_(torch.empty(n, 1, b), a)) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.output_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w0, b0 = self.weight[0], self.bias[0]
        if x.dim() == 2:  # shared input: [B, in] @ [in, n * out] in one matmul
            n, fan_in, fan_out = w0.shape
            h = (x @ w0.permute(1, 0, 2).reshape(fan_in, n * fan_out)).view(-1, n, fan_out)
            h = torch.relu(h.transpose(0, 1) + b0)
        else:
            h = torch.relu(torch.baddbmm(b0, x, w0))
        for w, b in zip(list(self.weight)[1:], list(self.bias)[1:], strict=True):
            h = torch.relu(torch.baddbmm(b, h, w))
        return h


def task_count(model: CVRModel, task_axis: str) -> int:
    """Tasks of a multi-task baseline: one per conversion type or one per display scenario."""
    if task_axis not in TASK_AXES:
        raise ValueError(f"task_axis must be one of {TASK_AXES}, got {task_axis!r}")
    return model.n_types if task_axis == "type" else model.n_scenarios


class RoutedTower(nn.Module):
    """One ReLU MLP (1-unit logit output) per group; each row runs its own group's only."""

    def __init__(self, dims: Sequence[int], n_groups: int) -> None:
        super().__init__()
        self.dims = [int(d) for d in dims]
        if len(self.dims) < 2 or self.dims[-1] != 1:
            raise ValueError(f"tower dims must run from input to a 1-unit output, got {dims}")
        self.n_groups = int(n_groups)
        pairs = list(zip(self.dims[:-1], self.dims[1:], strict=True))
        self.weight = nn.ParameterList(
            nn.Parameter(uniform_(torch.empty(n_groups, a, b), a)) for a, b in pairs)
        self.bias = nn.ParameterList(
            nn.Parameter(uniform_(torch.empty(n_groups, b), a)) for a, b in pairs)

    def forward(self, h: torch.Tensor, group: torch.Tensor, plan: GroupPlan | None = None) -> torch.Tensor:
        """Logits [B]."""
        plan = plan or GroupPlan.build(group, self.n_groups, h.dtype)
        last = len(self.weight) - 1
        for i, (w, b) in enumerate(zip(self.weight, self.bias, strict=True)):
            h = routed_linear(plan, h, w, b)
            if i < last:
                h = torch.relu(h)
        return h.squeeze(-1)


class MMoE(CVRModel):
    """Shared embedding + CTR tower + (shared experts, per-task gate, per-task CVR tower)."""

    kind = "mmoe_type"

    def __init__(
        self,
        feature_cardinalities: Sequence[int],
        embedding_dim: int,
        ctr_hidden: Sequence[int],
        cvr_hidden: Sequence[int],
        n_types: int,
        n_scenarios: int,
        task_axis: str = "type",
        n_experts: int = 4,
        expert_hidden: Sequence[int] | None = None,
        tower_hidden: Sequence[int] | None = None,
        field_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(n_types, n_scenarios)
        self.task_axis, self.n_tasks = task_axis, task_count(self, task_axis)
        default_experts, default_tower = split_hidden(cvr_hidden)
        expert_hidden = tuple(expert_hidden or default_experts)
        tower_hidden = tuple(default_tower if tower_hidden is None else tower_hidden)
        d_in = self.build_shared_inputs(feature_cardinalities, embedding_dim, ctr_hidden, field_names)
        self.experts = ExpertBank(d_in, expert_hidden, n_experts)
        # All tasks' gate logits come from one [in, K * E] matmul (K * E is small), and
        # each row keeps its own task's E logits.
        self.gate = nn.Linear(d_in, self.n_tasks * n_experts)
        self.towers = RoutedTower([self.experts.output_dim, *tower_hidden, 1], self.n_tasks)

    @classmethod
    def from_config(cls, cfg: PipelineConfig, n_types: int, n_scenarios: int,
                    task_axis: str = "type", **kwargs: object) -> MMoE:
        kwargs.setdefault("n_experts", cfg.zoo.mmoe_experts)
        return cls(**config_inputs(cfg), cvr_hidden=cfg.model.cvr_hidden, n_types=n_types,
                   n_scenarios=n_scenarios, task_axis=task_axis, **kwargs)  # type: ignore[arg-type]

    @property
    def n_domain_param_sets(self) -> int:
        """One task-specific set (gate + tower) per task; the experts are shared."""
        return self.n_tasks

    def task_of(self, type_id: torch.Tensor, scenario_id: torch.Tensor) -> torch.Tensor:
        return (type_id if self.task_axis == "type" else scenario_id).long()

    def forward(self, features: torch.Tensor, type_id: torch.Tensor,
                scenario_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding(features, type_id, scenario_id)
        task = self.task_of(type_id, scenario_id)
        experts = self.experts(x)  # [E, B, d]
        logits = self.gate(x).view(x.shape[0], self.n_tasks, self.experts.n)
        gate = torch.softmax(logits[torch.arange(x.shape[0], device=x.device), task], dim=-1)
        mixed = torch.einsum("be,ebd->bd", gate, experts)
        return self.ctr_tower(x), torch.sigmoid(self.towers(mixed, task))


@register_model("mmoe_type")
def _build_mmoe_type(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> MMoE:
    """MMoE with one task (gate + tower) per conversion type."""
    return MMoE.from_config(cfg, n_types, n_scenarios, task_axis="type")


@register_model("mmoe_scen")
def _build_mmoe_scen(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> MMoE:
    """MMoE with one task (gate + tower) per display scenario."""
    return MMoE.from_config(cfg, n_types, n_scenarios, task_axis="scenario")
