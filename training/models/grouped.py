"""Per-group linear maps y_i = x_i @ W[g_i] + b[g_i] at one matmul's cost, fast on CPU.

Rows are sorted by group once per forward (a permutation), each present group runs one
contiguous matmul, and the result is permuted back. Two hand-written autograd Functions
avoid the slow paths of generic autograd on CPU: gathering rows through index_select
back-propagates with a serial scatter-add, and slicing W[g] per group materialises a
zero-filled gradient the size of W for every group. Here the backward of a permutation is
the inverse permutation, and W's gradient is allocated once and written group by group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class _RowPermute(torch.autograd.Function):
    """x[perm] whose backward is a gather by the inverse permutation (no scatter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _SortedGroupedLinear(torch.autograd.Function):
    """Rows already sorted by group; ``counts[g]`` consecutive rows use W[g], b[g]."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                counts: list[int]) -> torch.Tensor:
        y = x.new_empty(x.shape[0], weight.shape[2])
        start = 0
        for g, n in enumerate(counts):
            if n:
                torch.addmm(bias[g], x[start:start + n], weight[g], out=y[start:start + n])
                start += n
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor,
                                                        torch.Tensor, None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight)  # every group's slice is written or zeroed below
        grad_b = grad.new_empty(weight.shape[0], weight.shape[2])
        start = 0
        for g, n in enumerate(ctx.counts):
            if not n:
                grad_w[g].zero_()
                grad_b[g].zero_()
                continue
            rows = slice(start, start + n)
            if grad_x is not None:
                torch.mm(grad[rows], weight[g].t(), out=grad_x[rows])
            torch.mm(x[rows].t(), grad[rows], out=grad_w[g])
            torch.sum(grad[rows], dim=0, out=grad_b[g])
            start += n
        return grad_x, grad_w, grad_b, None


@dataclass(frozen=True)
class GroupPlan:
    """How to sort a batch's rows by group id; built once, reused by every layer."""

    perm: torch.Tensor
    inverse: torch.Tensor
    counts: list[int]
    onehot: torch.Tensor  # [B, G] float, for the dense path of tiny layers

    @classmethod
    def build(cls, group_id: torch.Tensor, n_groups: int, dtype: torch.dtype) -> GroupPlan:
        group_id = group_id.long()
        perm = torch.argsort(group_id, stable=True)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        counts = torch.bincount(group_id, minlength=n_groups).tolist()
        onehot = torch.nn.functional.one_hot(group_id, n_groups).to(dtype)
        return cls(perm=perm, inverse=inverse, counts=counts, onehot=onehot)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Sorted grouped matmuls: flops of one [B, in] x [in, out] matmul."""
        x_sorted = _RowPermute.apply(x, self.perm, self.inverse)
        y_sorted = _SortedGroupedLinear.apply(x_sorted, weight, bias, self.counts)
        return _RowPermute.apply(y_sorted, self.inverse, self.perm)

    def linear_dense(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Per-row weights selected by a one-hot matmul, then a row-wise product: for tiny
        layers, where G times the layer's size costs less than per-group dispatch (batched
        tiny matvecs, bmm, are slow on CPU). The weight gradient is a plain matmul, laid out
        like its parameter, as DDP's gradient buckets want."""
        n_groups, fan_in, fan_out = weight.shape
        rows = (self.onehot @ weight.reshape(n_groups, fan_in * fan_out)).view(-1, fan_in, fan_out)
        return (x.unsqueeze(-1) * rows).sum(1) + self.onehot @ bias
