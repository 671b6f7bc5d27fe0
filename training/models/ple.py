"""PLE, Progressive Layered Extraction (Tang et al., RecSys'20), as a multi-domain CVR
baseline: one task per conversion type (kind ``ple_type``) or per display scenario
(kind ``ple_scen``).

Each extraction level has shared experts and, per task, task-specific experts. A task's
gate mixes the shared experts and its own experts (CGC); below the last level a shared
gate mixes every expert into the shared representation that feeds the next level, and
each task's representation feeds its own experts at the next level. Levels are one
ReLU layer each, their widths the expert half of ``cfg.model.cvr_hidden`` (one level:
plain CGC); the rest of it sizes the per-task CVR towers.

Routing: every instance belongs to one task. Below the last level the shared gate needs
every task's experts on every row (that is PLE's definition, and the cost grows with the
task count); the last level and the towers run only the row's own task's experts, gate
and tower (grouped matmuls).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from core.config import PipelineConfig
from training.models.base import CVRModel, config_inputs
from training.models.grouped import GroupPlan
from training.models.mmoe import ExpertBank, RoutedTower, routed_linear, split_hidden, task_count, uniform_
from training.models.zoo import register_model


class ExtractionLevel(nn.Module):
    """One PLE level: shared experts, K x n_specific task experts, K task gates, and
    (below the last level) a shared gate over all experts."""

    def __init__(self, in_dim: int, out_dim: int, n_tasks: int, n_shared: int,
                 n_specific: int, last: bool) -> None:
        super().__init__()
        self.n_tasks, self.n_shared, self.n_specific, self.last = n_tasks, n_shared, n_specific, last
        self.shared = ExpertBank(in_dim, [out_dim], n_shared)
        # Task k's experts are rows k * n_specific ... (k + 1) * n_specific - 1.
        self.specific = ExpertBank(in_dim, [out_dim], n_tasks * n_specific)
        n_gate = n_shared + n_specific
        self.task_gate_weight = nn.Parameter(uniform_(torch.empty(n_tasks, in_dim, n_gate), in_dim))
        self.task_gate_bias = nn.Parameter(uniform_(torch.empty(n_tasks, n_gate), in_dim))
        self.shared_gate = None if last else nn.Linear(in_dim, n_shared + n_tasks * n_specific)
        self.output_dim = out_dim

    def forward_all(self, shared_in: torch.Tensor, task_in: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every task on every row: (shared_out [B, d], task_out [K, B, d]).

        ``task_in`` [K, B, in] holds each task's representation; None means every task
        reads ``shared_in`` (the first level).
        """
        k, n_sp = self.n_tasks, self.n_specific
        batch = shared_in.shape[0]
        shared = self.shared(shared_in)  # [n_sh, B, d]
        if task_in is None:
            specific = self.specific(shared_in)
            w = self.task_gate_weight
            logits = (shared_in @ w.permute(1, 0, 2).reshape(w.shape[1], -1)).view(batch, k, -1)
            logits = logits.transpose(0, 1) + self.task_gate_bias.unsqueeze(1)  # [K, B, n_gate]
        else:
            specific = self.specific(task_in.repeat_interleave(n_sp, dim=0))
            logits = torch.baddbmm(self.task_gate_bias.unsqueeze(1), task_in, self.task_gate_weight)
        d = specific.shape[-1]
        per_task = torch.cat([shared.unsqueeze(0).expand(k, -1, -1, -1),
                              specific.view(k, n_sp, batch, d)], dim=1)  # [K, n_gate, B, d]
        task_out = torch.einsum("kbe,kebd->kbd", torch.softmax(logits, dim=-1), per_task)
        if self.shared_gate is None:
            raise RuntimeError("the last PLE level has no shared output; use forward_routed")
        gate = torch.softmax(self.shared_gate(shared_in), dim=-1)  # [B, n_sh + K * n_sp]
        shared_out = torch.einsum("be,ebd->bd", gate, torch.cat([shared, specific], dim=0))
        return shared_out, task_out

    def forward_routed(self, shared_in: torch.Tensor, task_in: torch.Tensor,
                       plan: GroupPlan) -> torch.Tensor:
        """Last level, each row's own task only: [B, d]. ``task_in`` [B, in] is the row's
        own task representation."""
        shared = self.shared(shared_in)  # [n_sh, B, d]
        w, b = self.specific.weight[0], self.specific.bias[0]  # [K * n_sp, in, d], [K * n_sp, 1, d]
        w = w.view(self.n_tasks, self.n_specific, *w.shape[1:])
        b = b.view(self.n_tasks, self.n_specific, b.shape[-1])
        own = [torch.relu(routed_linear(plan, task_in, w[:, j], b[:, j])) for j in range(self.n_specific)]
        gate = torch.softmax(routed_linear(plan, task_in, self.task_gate_weight, self.task_gate_bias), -1)
        return torch.einsum("be,ebd->bd", gate, torch.cat([shared, torch.stack(own)], dim=0))


class PLE(CVRModel):
    """Shared embedding + CTR tower + PLE extraction levels + per-task CVR towers."""

    kind = "ple_type"

    def __init__(
        self,
        feature_cardinalities: Sequence[int],
        embedding_dim: int,
        ctr_hidden: Sequence[int],
        cvr_hidden: Sequence[int],
        n_types: int,
        n_scenarios: int,
        task_axis: str = "type",
        n_shared: int = 2,
        n_specific: int = 1,
        level_dims: Sequence[int] | None = None,
        tower_hidden: Sequence[int] | None = None,
        field_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(n_types, n_scenarios)
        if n_shared < 1 or n_specific < 1:
            raise ValueError("PLE needs >= 1 shared and >= 1 task-specific expert")
        self.task_axis, self.n_tasks = task_axis, task_count(self, task_axis)
        default_levels, default_tower = split_hidden(cvr_hidden)
        level_dims = tuple(level_dims or default_levels)
        tower_hidden = tuple(default_tower if tower_hidden is None else tower_hidden)
        d_in = self.build_shared_inputs(feature_cardinalities, embedding_dim, ctr_hidden, field_names)
        dims = [d_in, *level_dims]
        self.levels = nn.ModuleList(
            ExtractionLevel(a, b, self.n_tasks, n_shared, n_specific, last=i == len(level_dims) - 1)
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)))
        self.towers = RoutedTower([dims[-1], *tower_hidden, 1], self.n_tasks)

    @classmethod
    def from_config(cls, cfg: PipelineConfig, n_types: int, n_scenarios: int,
                    task_axis: str = "type", **kwargs: object) -> PLE:
        kwargs.setdefault("n_shared", cfg.zoo.ple_shared_experts)
        kwargs.setdefault("n_specific", cfg.zoo.ple_specific_experts)
        return cls(**config_inputs(cfg), cvr_hidden=cfg.model.cvr_hidden, n_types=n_types,
                   n_scenarios=n_scenarios, task_axis=task_axis, **kwargs)  # type: ignore[arg-type]

    @property
    def n_domain_param_sets(self) -> int:
        """One task-specific set (experts + gate + tower) per task; shared experts aside."""
        return self.n_tasks

    def forward(self, features: torch.Tensor, type_id: torch.Tensor,
                scenario_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding(features, type_id, scenario_id)
        task = (type_id if self.task_axis == "type" else scenario_id).long()
        plan = GroupPlan.build(task, self.n_tasks, x.dtype)
        shared, tasks = x, None
        for level in list(self.levels)[:-1]:
            shared, tasks = level.forward_all(shared, tasks)
        own = x if tasks is None else tasks[task, torch.arange(x.shape[0], device=x.device)]
        h = self.levels[-1].forward_routed(shared, own, plan)
        return self.ctr_tower(x), torch.sigmoid(self.towers(h, task, plan))


@register_model("ple_type")
def _build_ple_type(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> PLE:
    """PLE with one task (experts + gate + tower) per conversion type."""
    return PLE.from_config(cfg, n_types, n_scenarios, task_axis="type")


@register_model("ple_scen")
def _build_ple_scen(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> PLE:
    """PLE with one task (experts + gate + tower) per display scenario."""
    return PLE.from_config(cfg, n_types, n_scenarios, task_axis="scenario")
