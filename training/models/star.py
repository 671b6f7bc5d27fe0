"""STAR, the Star Topology Adaptive Recommender (Sheng et al., CIKM'21), for CVR with a
domain = one (conversion type, display scenario) pair, N_t x N_s domains in all.

* Partitioned normalization (PN) of the embedded input: every domain keeps its own
  moving mean / variance and its own scale / bias on top of the shared ones,
  ``z' = (gamma * gamma_p) * (z - mu_p) / sqrt(var_p + eps) + (beta + beta_p)``.
  In training mu_p / var_p are the statistics of the batch's rows of domain p (mixed
  batches: each domain is normalized by its own rows only); at eval they are the
  domain's running statistics.
* Star-topology FCN: every layer's weights are the shared weights times the domain's
  weights, element-wise, and its bias the sum: ``W_p* = W (.) W_p, b_p* = b + b_p``.
  Rows are grouped by domain, and each present domain runs one matmul (``grouped.py``).
* Auxiliary network: a small MLP over the domain-indicator embedding and the embedded
  input, whose logit is added to the star FCN's logit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from core.config import PipelineConfig
from training.layers import MLP
from training.models.base import CVRModel, config_inputs
from training.models.grouped import GroupPlan
from training.models.mmoe import DENSE_MAX_ELEMS
from training.models.zoo import register_model


class PartitionedNorm(nn.Module):
    """Batch normalization with per-domain statistics and per-domain affine terms.

    A domain with fewer than two rows in a training batch has no usable batch variance;
    its rows are normalized with that domain's running statistics (which that batch then
    leaves untouched), instead of collapsing to the bias as single-row batch norm would.
    """

    def __init__(self, num_features: int, n_domains: int, momentum: float = 0.1,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.n_domains, self.momentum, self.eps = int(n_domains), float(momentum), float(eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.domain_weight = nn.Parameter(torch.ones(n_domains, num_features))
        self.domain_bias = nn.Parameter(torch.zeros(n_domains, num_features))
        self.register_buffer("running_mean", torch.zeros(n_domains, num_features))
        self.register_buffer("running_var", torch.ones(n_domains, num_features))

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        domain = domain.long()
        if self.training:
            mean, var = self._batch_stats(x, domain)
        else:
            mean, var = self.running_mean[domain], self.running_var[domain]
        x_hat = (x - mean) * torch.rsqrt(var + self.eps)
        return (x_hat * (self.weight * self.domain_weight[domain])
                + (self.bias + self.domain_bias[domain]))

    def _batch_stats(self, x: torch.Tensor, domain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (mean, biased var) of the row's domain in this batch; updates running stats."""
        present, inverse, counts = torch.unique(domain, return_inverse=True, return_counts=True)
        n = counts.to(x.dtype).unsqueeze(1)
        mean = x.new_zeros(present.numel(), x.shape[1]).index_add(0, inverse, x) / n
        centered = x - mean[inverse]
        var = x.new_zeros(present.numel(), x.shape[1]).index_add(0, inverse, centered * centered) / n
        usable = counts >= 2
        with torch.no_grad():
            ids = present[usable]
            unbiased = var[usable] * (n[usable] / (n[usable] - 1))
            self.running_mean[ids] = torch.lerp(self.running_mean[ids], mean[usable].detach(), self.momentum)
            self.running_var[ids] = torch.lerp(self.running_var[ids], unbiased.detach(), self.momentum)
        row_usable = usable[inverse].unsqueeze(1)
        row_mean = torch.where(row_usable, mean[inverse], self.running_mean[domain])
        row_var = torch.where(row_usable, var[inverse], self.running_var[domain])
        return row_mean, row_var


class StarFCN(nn.Module):
    """An MLP (ReLU, 1-unit logit output) whose layer p-weights are W (.) W_p, b + b_p."""

    def __init__(self, dims: Sequence[int], n_domains: int) -> None:
        super().__init__()
        self.dims = [int(d) for d in dims]
        if len(self.dims) < 2 or self.dims[-1] != 1:
            raise ValueError(f"tower dims must run from input to a 1-unit output, got {dims}")
        pairs = list(zip(self.dims[:-1], self.dims[1:], strict=True))
        # Shared weights: nn.Linear's init. Domain weights start at 1 and domain biases at
        # 0, so every domain starts from the shared network (as in the paper).
        self.weight = nn.ParameterList(
            nn.Parameter(torch.empty(a, b).uniform_(-1 / math.sqrt(a), 1 / math.sqrt(a))) for a, b in pairs)
        self.bias = nn.ParameterList(
            nn.Parameter(torch.empty(b).uniform_(-1 / math.sqrt(a), 1 / math.sqrt(a))) for a, b in pairs)
        self.domain_weight = nn.ParameterList(nn.Parameter(torch.ones(n_domains, a, b)) for a, b in pairs)
        self.domain_bias = nn.ParameterList(nn.Parameter(torch.zeros(n_domains, b)) for _, b in pairs)

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """Logits [B]; only the domains present in the batch get their weights composed."""
        present, inverse = torch.unique(domain.long(), return_inverse=True)
        plan = GroupPlan.build(inverse, present.numel(), x.dtype)
        h = x
        last = len(self.weight) - 1
        for i in range(len(self.weight)):
            weight = self.weight[i] * self.domain_weight[i][present]  # [P, in, out]
            bias = self.bias[i] + self.domain_bias[i][present]  # [P, out]
            small = weight.shape[1] * weight.shape[2] <= DENSE_MAX_ELEMS
            h = plan.linear_dense(h, weight, bias) if small else plan.linear(h, weight, bias)
            if i < last:
                h = torch.relu(h)
        return h.squeeze(-1)


class STAR(CVRModel):
    """Shared embedding + CTR tower + PN -> star FCN (+ auxiliary logit) for CVR."""

    kind = "star"

    def __init__(
        self,
        feature_cardinalities: Sequence[int],
        embedding_dim: int,
        ctr_hidden: Sequence[int],
        cvr_hidden: Sequence[int],
        n_types: int,
        n_scenarios: int,
        aux_hidden: Sequence[int] | None = None,
        field_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(n_types, n_scenarios)
        n_domains = self.n_types * self.n_scenarios
        d_in = self.build_shared_inputs(feature_cardinalities, embedding_dim, ctr_hidden, field_names)
        self.norm = PartitionedNorm(d_in, n_domains)
        self.star = StarFCN([d_in, *cvr_hidden, 1], n_domains)
        # The paper's auxiliary network is a small 2-layer FCN: default one hidden layer
        # as wide as the CVR tower's last one.
        aux_hidden = tuple(aux_hidden if aux_hidden is not None else tuple(cvr_hidden)[-1:])
        self.domain_embedding = nn.Embedding(n_domains, embedding_dim)
        nn.init.normal_(self.domain_embedding.weight, std=0.01)
        self.aux = MLP(d_in + embedding_dim, aux_hidden, out_dim=1)

    @classmethod
    def from_config(cls, cfg: PipelineConfig, n_types: int, n_scenarios: int) -> STAR:
        return cls(**config_inputs(cfg), cvr_hidden=cfg.model.cvr_hidden, n_types=n_types,
                   n_scenarios=n_scenarios)

    @property
    def n_domain_param_sets(self) -> int:
        """One FCN weight set (plus PN terms) per (type, scenario) domain."""
        return self.n_types * self.n_scenarios

    def domain_of(self, type_id: torch.Tensor, scenario_id: torch.Tensor) -> torch.Tensor:
        return type_id.long() * self.n_scenarios + scenario_id.long()

    def forward(self, features: torch.Tensor, type_id: torch.Tensor,
                scenario_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding(features, type_id, scenario_id)
        domain = self.domain_of(type_id, scenario_id)
        main = self.star(self.norm(x, domain), domain)
        aux = self.aux(torch.cat([x, self.domain_embedding(domain)], dim=1)).squeeze(-1)
        return self.ctr_tower(x), torch.sigmoid(main + aux)


@register_model("star")
def _build_star(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> STAR:
    return STAR.from_config(cfg, n_types, n_scenarios)
