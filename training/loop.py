"""The epoch / step loop of :func:`training.trainer.train`, its mutable state, validation.

A validation slice is evaluated every ``cfg.training.eval_every_steps`` steps; training
stops after ``cfg.training.early_stopping_patience`` evaluations without improvement of the
validation CVR + CTCVR logloss, and the best weights are kept for restoring.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from core.config import PipelineConfig
from training.checkpoints import cpu_state
from training.data import BucketRange, SampleStream, batch_to_device, count_rows
from training.distributed import DistInfo, global_batch_loss, lockstep
from training.metrics import auc, logloss
from training.models import CVRModel, loss_config
from training.options import TrainOptions

MIN_IMPROVEMENT = 1e-6


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step."""


@torch.no_grad()
def validate(net: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float | None]:
    """val_* logloss and AUC of CTR (all), CVR (clicked) and CTCVR (all)."""
    was_training = net.training
    net.eval()
    parts: dict[str, list[np.ndarray]] = {"p_ctr": [], "p_cvr": [], "click": [], "conversion": []}
    for b in batches:
        p_ctr, p_cvr = net(b["features"], b["type_id"], b["scenario_id"])
        for key, value in (("p_ctr", p_ctr), ("p_cvr", p_cvr), ("click", b["click"]),
                           ("conversion", b["conversion"])):
            parts[key].append(value.double().cpu().numpy())
    net.train(was_training)
    p_ctr, p_cvr, click, conv = (np.concatenate(parts[k]) for k in ("p_ctr", "p_cvr", "click",
                                                                     "conversion"))
    clicked = click > 0
    out = {
        "val_ctr_logloss": logloss(click, p_ctr),
        "val_cvr_logloss": logloss(conv[clicked], p_cvr[clicked]),
        "val_ctcvr_logloss": logloss(conv, p_ctr * p_cvr),
        "val_ctr_auc": auc(click, p_ctr),
        "val_cvr_auc": auc(conv[clicked], p_cvr[clicked]),
        "val_ctcvr_auc": auc(conv, p_ctr * p_cvr),
    }
    ctcvr, cvr = out["val_ctcvr_logloss"], out["val_cvr_logloss"]
    out["val_objective"] = None if ctcvr is None else ctcvr + (cvr or 0.0)
    return out


@dataclass
class Progress:
    """Everything the loop mutates; checkpointed as a whole."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    seconds: float = 0.0
    best_objective: float | None = None
    best_step: int | None = None
    best_val: dict[str, float | None] = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] | None = None
    bad_evals: int = 0
    last_eval_step: int | None = None
    stopped_early: bool = False
    window: list[list[float]] = field(default_factory=list)  # train losses since last log
    done: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    def to_state(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(**state)


class Loop:
    """The epoch / step loop, split out of train() to keep each piece small."""

    def __init__(self, cfg: PipelineConfig, model: CVRModel, net: nn.Module,
                 optimizer: torch.optim.Optimizer, device: torch.device, info: DistInfo,
                 state: Progress, val_batches: list[dict[str, torch.Tensor]],
                 checkpoint: Callable[[], None], options: TrainOptions) -> None:
        self.cfg, self.model, self.net, self.optimizer = cfg, model, net, optimizer
        self.loss_cfg = loss_config(cfg, model)
        self.device, self.info, self.state = device, info, state
        self.val_batches, self.checkpoint = val_batches, checkpoint
        self.log_fn, self.on_step = options.log_fn, options.on_step
        self.log_every, self.max_steps = max(1, options.log_every_steps), options.max_steps
        self.window_samples, self.window_seconds = 0, 0.0
        self.t_last = time.perf_counter()
        self.step_loss = options.step_loss  # a plug-in's loss (training.hooks); None = plain

    def run(self, days: Sequence[str], ranges: tuple[BucketRange, ...], show: bool) -> None:
        cfg, state = self.cfg, self.state
        # training.batch_size is the GLOBAL batch: under DDP each rank takes its slice of the
        # very batch one process would see (SampleStream.iter_chunks) and the loss is that
        # whole batch's (global_batch_loss), so DDP trains what one process trains; and
        # N ranks make the same number of optimizer steps on the same samples as one process.
        rank_batch = max(1, cfg.training.batch_size // self.info.world_size)
        per_epoch = max(1, count_rows(cfg, days) // (rank_batch * self.info.world_size))
        total = min(per_epoch * cfg.training.epochs, self.max_steps or 1 << 62)
        bar = tqdm(total=total, initial=state.step, disable=not (show and self.info.is_main),
                   unit="step", dynamic_ncols=True)
        try:
            while state.epoch < cfg.training.epochs and not self._should_stop():
                stream = SampleStream(
                    cfg, days, batch_size=rank_batch, shuffle=True, epoch=state.epoch, rank=self.info.rank,
                    world_size=self.info.world_size, ranges=ranges,
                    skip_batches=state.batch_in_epoch,
                    with_impression_id=self.step_loss is not None and self.step_loss.needs_impression_ids,
                )
                self.t_last = time.perf_counter()
                for batch in lockstep(stream, self.info, self.device):
                    self._step(batch, bar)
                    if self._should_stop():
                        break
                else:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if state.step == 0:
                raise ValueError(f"no training rows in days {list(days)}")
            if self.val_batches and state.last_eval_step != state.step:
                self._evaluate()
        finally:
            bar.close()

    def _should_stop(self) -> bool:
        s = self.state
        return s.stopped_early or (self.max_steps is not None and s.step >= self.max_steps)

    def _step(self, batch: dict[str, Any], bar: tqdm) -> None:
        state = self.state
        b = batch_to_device(batch, self.device)
        if self.step_loss is None:
            p_ctr, p_cvr = self.net(b["features"], b["type_id"], b["scenario_id"])
            loss = global_batch_loss(self.loss_cfg, p_ctr, p_cvr, b, self.info)
        else:
            # A plug-in's step loss (training.hooks.StepLoss, e.g. SSIM reuse) replaces the
            # plain computation above; it keeps exactly that value on a batch it leaves alone.
            loss = self.step_loss.loss(self.net, b, self.loss_cfg)
        # Generic hook: a model with its own regularizer (MI-DPG's mutual-information term)
        # computes it in forward and exposes it as auxiliary_loss(); it joins the total.
        auxiliary = getattr(self.model, "auxiliary_loss", None)
        if callable(auxiliary):
            loss = loss._replace(total=loss.total + auxiliary())
        step = state.step + 1
        value = float(loss.total.detach())
        if not np.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite training loss {value} at step {step} (epoch {state.epoch}, "
                f"batch {state.batch_in_epoch + 1}): ctr={float(loss.ctr.detach()):.6g}, "
                f"ctcvr={float(loss.ctcvr.detach()):.6g}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        self.optimizer.step()
        n = int(b["click"].shape[0])
        elapsed = time.perf_counter() - self.t_last  # data loading included, eval excluded
        state.step, state.batch_in_epoch = step, state.batch_in_epoch + 1
        state.samples += n
        state.seconds += elapsed
        state.window.append([value, float(loss.ctr.detach()), float(loss.ctcvr.detach())])
        self.window_samples += n
        self.window_seconds += elapsed
        bar.update(1)
        if step % self.log_every == 0:
            self._log_train(bar)
        if self.val_batches and step % self.cfg.training.eval_every_steps == 0:
            self._evaluate()
        if step % self.cfg.training.checkpoint_every_steps == 0:
            self.checkpoint()
        if self.on_step is not None:
            self.on_step(step)
        self.t_last = time.perf_counter()

    def _log_train(self, bar: tqdm) -> None:
        losses = np.asarray(self.state.window)
        rate = self.window_samples / self.window_seconds if self.window_seconds else 0.0
        metrics = {"train_loss": float(losses[:, 0].mean()),
                   "train_ctr_loss": float(losses[:, 1].mean()),
                   "train_ctcvr_loss": float(losses[:, 2].mean()),
                   "samples_per_sec": rate}
        bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", samples_s=f"{rate:,.0f}")
        self.state.window, self.window_samples, self.window_seconds = [], 0, 0.0
        self._emit(metrics)

    def _emit(self, metrics: dict[str, float | None]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.state.history.append({"step": float(self.state.step), **clean})
        if self.log_fn is not None and self.info.is_main:
            self.log_fn(clean, self.state.step)

    def _evaluate(self) -> None:
        state = self.state
        metrics = validate(self.model, self.val_batches)
        state.last_eval_step = state.step
        objective = metrics["val_objective"]
        if objective is not None and (state.best_objective is None
                                      or objective < state.best_objective - MIN_IMPROVEMENT):
            state.best_objective, state.best_step, state.bad_evals = objective, state.step, 0
            state.best_val = {**metrics, "step": float(state.step)}
            state.best_state = cpu_state(self.model)
        else:
            state.bad_evals += 1
            if state.bad_evals >= max(1, self.cfg.training.early_stopping_patience):
                state.stopped_early = True
        self._emit(metrics)
