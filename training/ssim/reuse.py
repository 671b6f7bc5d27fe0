"""SSIM's reuse phase as a trainer plug-in (training.hooks.StepLoss): each batch's selected
pairs ride along as extra rows routed to their target domains and add their CTCVR loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.config import Model, PipelineConfig, Ssim
from training.losses import LossOutput, loss_from_config
from training.ssim.losses import home_weight, shared_ctcvr_loss, with_extra_rows
from training.ssim.store import SharedSet


class SharedTraining:
    """The reuse phase inside the trainer (a ``training.hooks.StepLoss``): per-batch lookup
    of the selected pairs and the loss with them. Built by :func:`shared_training`."""

    needs_impression_ids = True  # the lookup is keyed by impression id
    # The shared term is weighted by each rank's own batch, not the global one the trainer
    # reproduces under DDP: single-process only.
    distributed = False

    def __init__(self, shared_set: SharedSet, ratio: float | None, ssim: Ssim) -> None:
        selected = shared_set.selection(ratio).sort_values(
            ["impression_id", "type_id", "scenario_id"], kind="mergesort")
        ids = selected["impression_id"].to_numpy(dtype=object)
        unique, starts, counts = np.unique(ids, return_index=True, return_counts=True)
        self.set_id, self.ratio, self.n_pairs = shared_set.set_id, ratio, len(selected)
        self._index = pd.Index(unique)
        self._starts, self._counts = starts, counts
        self._type = torch.from_numpy(selected["type_id"].to_numpy(np.int64))
        self._scenario = torch.from_numpy(selected["scenario_id"].to_numpy(np.int64))
        self.scale_beta = ssim.shared_loss_weight
        self.rows_added = 0  # shared rows trained on, summed over steps (for reporting)

    def bind(self, model: nn.Module) -> None:
        """Refuse a set whose target domains the model has no towers for."""
        n_types, n_scenarios = int(model.n_types), int(model.n_scenarios)
        if self.n_pairs and (int(self._type.max()) >= n_types or int(self._scenario.max()) >= n_scenarios):
            raise ValueError(f"shared set {self.set_id} targets domains beyond the model's "
                             f"{n_types} x {n_scenarios}")

    def stats(self) -> dict[str, float]:
        return {"ssim_shared_rows": float(self.rows_added)}

    def fingerprint(self) -> dict[str, Any]:
        return {"set_id": self.set_id, "ratio": self.ratio}

    def pairs(self, impression_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(batch row, index into the selection) of every selected pair of these rows."""
        pos = self._index.get_indexer(list(impression_ids))
        hit = np.flatnonzero(pos >= 0)
        counts = self._counts[pos[hit]]
        rows = np.repeat(hit, counts)
        firsts = np.repeat(self._starts[pos[hit]] - (np.cumsum(counts) - counts), counts)
        return rows, firsts + np.arange(rows.size)

    def loss(self, net: nn.Module, b: dict[str, Any], loss_cfg: Model) -> LossOutput:
        """The step's loss: plain when the batch holds no shared pair; else one forward over
        the rows plus their shared copies, and the shared CTCVR term added to the total."""
        if "impression_id" not in b:
            raise ValueError("SSIM reuse needs batches with impression ids")
        rows, sel = self.pairs(b["impression_id"])
        if rows.size == 0:
            p_ctr, p_cvr = net(b["features"], b["type_id"], b["scenario_id"])
            return loss_from_config(loss_cfg, p_ctr, p_cvr, b)
        device = b["features"].device
        rows_t = torch.from_numpy(rows).to(device)
        sel_t = torch.from_numpy(sel)
        feats, t, s = with_extra_rows(b, rows_t, self._type[sel_t].to(device),
                                       self._scenario[sel_t].to(device))
        n = int(b["click"].shape[0])
        p_ctr, p_cvr = net(feats, t, s)
        main = loss_from_config(loss_cfg, p_ctr[:n], p_cvr[:n], b)
        shared = shared_ctcvr_loss(p_ctr[n:], p_cvr[n:], b["conversion"][rows_t],
                                   home_weight(loss_cfg, b)[rows_t], n,
                                   float(loss_cfg.alpha) * self.scale_beta)
        self.rows_added += int(rows.size)
        return main._replace(total=main.total + shared)


def shared_training(cfg: PipelineConfig, shared_set: SharedSet, ratio: float | None = None,
                    ) -> SharedTraining:
    """The trainer plug-in for ``shared_set``: its search selection (``ratio=None``) or the
    top ``ratio`` per target domain by score, with ``cfg.ssim``'s shared-loss weight.
    Pass it as ``TrainOptions(step_loss=...)``; a new one per training run (it counts rows)."""
    return SharedTraining(shared_set, ratio, cfg.ssim)
