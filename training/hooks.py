"""The trainer's plug-in point: a step loss that replaces the plain per-batch loss.

Why: optional training stages (SSIM's shared instances today) change what one optimizer
step optimizes, but the trainer should not know them by name. A plug-in implements
:class:`StepLoss`; the trainer binds it to the model it built, asks it for each batch's
loss, folds its fingerprint into the checkpoint's, and reports its counters.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from core.config import Model
from training.losses import LossOutput


@runtime_checkable
class StepLoss(Protocol):
    """One training step's loss, computed by a plug-in instead of the plain loss.

    ``needs_impression_ids``: batches must carry their impression ids (a per-row lookup).
    ``distributed``: the loss is what one process computes under DDP too; when False the
    trainer refuses to run it under torchrun rather than silently train another objective.
    """

    needs_impression_ids: bool
    distributed: bool

    def bind(self, model: nn.Module) -> None:
        """Check the plug-in fits the freshly built model (e.g. its domain counts)."""
        ...

    def loss(self, net: nn.Module, batch: dict[str, torch.Tensor], loss_cfg: Model) -> LossOutput:
        """The step's loss of ``net`` on the (device) ``batch``, ``total`` to backpropagate."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """What makes a checkpoint of this plug-in's run reusable (JSON-able, compared by ==)."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters for the run's report (e.g. shared rows trained on), keyed by metric name."""
        ...
