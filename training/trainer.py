"""Train a CVR model on a window of days: seeded, checkpointed, resumable, early-stopped.

A validation slice is carved from the training days by the impression_id hash (buckets
next to the holdout's, so the two never overlap) and evaluated every
``cfg.training.eval_every_steps`` steps; training stops after
``cfg.training.early_stopping_patience`` evaluations without improvement of the
validation CVR + CTCVR logloss, and the best weights are restored.

Every ``cfg.training.checkpoint_every_steps`` steps the full state (model, optimizer,
RNG, data position, early-stopping state) is written atomically; a restarted run with
the same inputs resumes from it and ends with the same weights as an uninterrupted run.
Under ``torchrun`` each rank trains with DDP (gloo on CPU, NCCL on GPU) on its slice of
every global batch, with the whole batch's loss: the same steps as one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from core.config import PipelineConfig, Training, add_config_arguments, load_config
from core.vocab import load_vocab
from training.data import (
    HASH_BUCKETS,
    BucketRange,
    SampleStream,
    batch_to_device,
    count_rows,
    fraction_to_buckets,
)
from training.losses import LossOutput, loss_from_config
from training.metrics import auc, logloss
from training.models import CVRModel, build_model, check_capacity, loss_config, training_config

if TYPE_CHECKING:  # SSIM hook: training.ssim imports this module, so only for typing
    from training.ssim import SharedSet, SharedTraining

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "latest.pt"
CHECKPOINT_FORMAT = 1
DEFAULT_MAX_VAL_ROWS = 200_000
MIN_IMPROVEMENT = 1e-6

LogFn = Callable[[dict[str, float], int], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step."""


@dataclass
class TrainResult:
    model: CVRModel
    n_types: int
    n_scenarios: int
    history: list[dict[str, float]]
    samples_per_sec: float
    steps: int
    best_val: dict[str, float | None]
    best_step: int | None = None
    stopped_early: bool = False
    resumed_from_step: int | None = None
    checkpoint_path: Path | None = None
    shared_rows: int | None = None  # SSIM hook: shared-instance rows trained on (None: no set)


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """auto -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("training.device=cuda but no CUDA device is available")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def vocab_sizes(cfg: PipelineConfig) -> tuple[int, int]:
    """(n_types, n_scenarios) from the persisted vocabularies."""
    n_types = len(load_vocab(cfg.paths.vocab_dir, cfg.domains.type_field))
    n_scenarios = len(load_vocab(cfg.paths.vocab_dir, cfg.domains.scenario_field))
    if not n_types or not n_scenarios:
        raise ValueError(f"empty domain vocabulary in {cfg.paths.vocab_dir}: "
                         f"{n_types} types, {n_scenarios} scenarios")
    return n_types, n_scenarios


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class SliceRanges:
    """Bucket ranges of the training rows and of the validation slice."""

    train: tuple[BucketRange, ...]
    validation: tuple[BucketRange, ...] | None


def slice_ranges(cfg: PipelineConfig, days: Sequence[str], split: str | None,
                 holdout_fraction: float | None, max_val_rows: int) -> SliceRanges:
    """Validation = the buckets right after the holdout's; training = everything after."""
    if split not in (None, "train"):
        raise ValueError(f"train() takes split=None or 'train' (not {split!r}): "
                         "training on the holdout would leak it")
    lo = 0
    if split == "train":
        if holdout_fraction is None:
            raise ValueError("split='train' needs holdout_fraction")
        lo = fraction_to_buckets(holdout_fraction)
    fraction = float(cfg.training.validation_fraction)
    if fraction > 0:
        total = max(1, count_rows(cfg, days))
        fraction = min(fraction, max_val_rows / total)
    width = max(1, fraction_to_buckets(fraction)) if fraction > 0 else 0
    if lo + width >= HASH_BUCKETS:
        raise ValueError("holdout + validation fractions leave no training rows")
    train = (BucketRange(0, lo + width, keep=False),) if lo + width else ()
    validation = (BucketRange(lo, lo + width, keep=True),) if width else None
    return SliceRanges(train=train, validation=validation)


# ------------------------------------------------------------------------ validation


def load_validation(cfg: PipelineConfig, days: Sequence[str], ranges: tuple[BucketRange, ...],
                    device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The validation slice, held in memory (its size is capped by max_val_rows)."""
    stream = SampleStream(cfg, days, batch_size=cfg.training.batch_size * 4, shuffle=False,
                          ranges=ranges)
    return [batch_to_device(b, device) for b in stream]  # type: ignore[misc]


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


# ----------------------------------------------------------------- distributed setup


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_setting: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        use_nccl = resolve_device(device_setting, local_rank).type == "cuda"
        dist.init_process_group("nccl" if use_nccl else "gloo")
        owns = True
    return DistInfo(rank, world_size, local_rank, owns)


def lockstep(batches: Iterable[dict], info: DistInfo, device: torch.device) -> Iterator[dict]:
    """Stop every rank as soon as any rank's shard runs out, so collectives stay matched."""
    if info.world_size == 1:
        yield from batches
        return

    def all_have(flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    for batch in batches:
        if not all_have(True):
            return
        yield batch
    all_have(False)


def global_batch_loss(loss_cfg: Any, p_ctr: torch.Tensor, p_cvr: torch.Tensor,
                      batch: dict[str, torch.Tensor], info: DistInfo) -> LossOutput:
    """The loss of the GLOBAL batch (every rank's rows), differentiable in this rank's rows.

    The loss depends on the whole mini-batch (dynamic weights N / N_c count domains in it),
    so the mean of per-rank losses, which plain DDP optimizes, is not what one process
    computes on the same global batch. Each rank gathers all ranks' predictions (detached),
    labels and domain ids, puts its own live predictions in its block and evaluates
    ``loss_from_config`` on the whole: the value is the single-process loss on every rank
    and the per-rank gradients sum to its gradient; DDP averages them, so ``total`` carries
    world_size times the gradient at an unchanged value.
    """
    if info.world_size == 1:
        return loss_from_config(loss_cfg, p_ctr, p_cvr, batch)
    cols = (p_ctr.detach(), p_cvr.detach(), batch["click"], batch["conversion"],
            batch["type_id"], batch["scenario_id"])
    local = torch.stack([c.to(torch.float64) for c in cols], dim=1)  # ids < 2**53: exact
    n = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(sizes, n)
    counts = [int(k) for k in sizes]
    padded = local.new_zeros(max(counts), local.shape[1])
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    rows = torch.cat([part[:k] for part, k in zip(parts, counts, strict=True)])
    lo = sum(counts[:info.rank])
    hi = lo + counts[info.rank]

    def spliced(col: int, live: torch.Tensor) -> torch.Tensor:
        other = rows[:, col].to(live.dtype)
        return torch.cat([other[:lo], live, other[hi:]])

    whole = {"click": rows[:, 2].to(batch["click"].dtype),
             "conversion": rows[:, 3].to(batch["conversion"].dtype),
             "type_id": rows[:, 4].to(batch["type_id"].dtype),
             "scenario_id": rows[:, 5].to(batch["scenario_id"].dtype)}
    loss = loss_from_config(loss_cfg, spliced(0, p_ctr), spliced(1, p_cvr), whole)
    total = loss.total
    return loss._replace(total=total + (info.world_size - 1) * (total - total.detach()))


# ----------------------------------------------------------------------- checkpoints


def _fingerprint(cfg: PipelineConfig, days: Sequence[str], kind: str, split: str | None,
                 holdout_fraction: float | None, n_types: int, n_scenarios: int,
                 world_size: int) -> dict[str, Any]:
    return {"config_hash": cfg.config_hash(), "days": list(days), "kind": kind,
            "split": split, "holdout_fraction": holdout_fraction, "n_types": n_types,
            "n_scenarios": n_scenarios, "world_size": world_size}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic write (tmp file + rename): a crash mid-write never corrupts the latest one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this very run, else None."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
        log.warning("ignoring checkpoint %s: it belongs to a different run", path)
        return None
    return state


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


# ---------------------------------------------------------------------------- loop


def parameter_groups(cfg: PipelineConfig, model: nn.Module) -> list[dict[str, Any]]:
    """The model's parameters for the optimizer: its domain-specific ones (if it names any)
    in their own group at ``training.domain_lr_scale`` times the learning rate."""
    domain = list(getattr(model, "domain_parameters", list)())
    training = training_config(cfg, model)
    scale, decay = training.domain_lr_scale, training.domain_weight_decay
    if not domain or (scale == 1.0 and decay == 0.0):
        return [{"params": list(model.parameters())}]
    ids = {id(p) for p in domain}
    shared = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": shared},
            {"params": domain, "lr": training.learning_rate * scale, "weight_decay": decay}]


def make_optimizer(cfg: PipelineConfig, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
                   device: torch.device, training: Training | None = None) -> torch.optim.Optimizer:
    """Adagrad (the paper's) or Adam, fused where torch has a fused kernel for the device:
    on CPU the fused step is ~4x faster than the per-tensor loop on the per-domain weights.
    ``training`` (default ``cfg.training``) is the model kind's effective training section."""
    training = training or cfg.training
    lr = training.learning_rate
    if training.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, initial_accumulator_value=training.initial_accumulator,
                                   fused=device.type == "cpu" or None)
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    raise ValueError(f"unknown optimizer {training.optimizer!r}")


@dataclass
class _Progress:
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
    def from_state(cls, state: dict[str, Any]) -> _Progress:
        return cls(**state)


def train(
    cfg: PipelineConfig,
    train_days: list[str],
    *,
    model_kind: str | None = None,
    holdout_fraction: float | None = None,
    split: str | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    progress: bool = True,
    log_fn: LogFn | None = None,
    n_types: int | None = None,
    n_scenarios: int | None = None,
    max_steps: int | None = None,
    log_every_steps: int = 50,
    max_val_rows: int = DEFAULT_MAX_VAL_ROWS,
    on_step: Callable[[int], None] | None = None,
    num_threads: int | None = None,
    shared_set: SharedSet | None = None,
    share_ratio: float | None = None,
) -> TrainResult:
    """Train ``model_kind`` (default cfg.model.kind) on ``train_days``; see module docstring.

    ``split="train"`` with ``holdout_fraction`` trains on the non-holdout hash buckets only
    (cold start). ``n_types`` / ``n_scenarios`` default to the vocabulary sizes.
    ``on_step(step)`` runs after each optimizer step (tests inject crashes with it).
    ``num_threads`` sets torch's intra-op threads (1 is fastest on a contended shared box).
    ``shared_set`` (training.ssim) adds the SSIM shared-instance CTCVR loss: the search's
    selection, or the top ``share_ratio`` per target domain by score; None trains exactly
    as without SSIM.
    """
    if not train_days:
        raise ValueError("train() needs at least one training day")
    if share_ratio is not None and shared_set is None:
        raise ValueError("share_ratio needs a shared_set")
    if num_threads is not None:
        torch.set_num_threads(max(1, int(num_threads)))
    info = init_distributed(cfg.training.device)
    if shared_set is not None and info.world_size > 1:
        # The shared-instance term is weighted by each rank's own batch, not the global one
        # that global_batch_loss reproduces, so it would train a different objective than
        # one process does. Refuse rather than silently diverge.
        raise ValueError("SSIM reuse (shared_set) runs single-process only: start training without "
                         f"torchrun (world size here: {info.world_size})")
    device = resolve_device(cfg.training.device, info.local_rank)
    if n_types is None or n_scenarios is None:
        vt, vs = vocab_sizes(cfg)
        n_types, n_scenarios = n_types or vt, n_scenarios or vs
    check_capacity(cfg, n_types, n_scenarios)
    kind = model_kind or cfg.model.kind
    ranges = slice_ranges(cfg, train_days, split, holdout_fraction, max_val_rows)

    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg, n_types, n_scenarios, kind).to(device)
    net: nn.Module = model
    if info.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = make_optimizer(cfg, parameter_groups(cfg, model), device, training_config(cfg, model))

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    fingerprint = _fingerprint(cfg, train_days, model.kind, split, holdout_fraction, n_types,
                               n_scenarios, info.world_size)
    # SSIM hook: the reuse phase's per-batch lookup (None without a set: the plain loop).
    ssim: SharedTraining | None = None
    if shared_set is not None:
        from training.ssim import shared_training

        ssim = shared_training(cfg, shared_set, share_ratio, n_types, n_scenarios)
        fingerprint["ssim"] = ssim.fingerprint()
    state = _Progress()
    resumed_from = None
    if ckpt_path is not None and resume:
        saved = load_checkpoint(ckpt_path, fingerprint)
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            _set_rng_state(saved["rng"])
            state = _Progress.from_state(saved["progress"])
            resumed_from = state.step
            log.info("resumed from %s at step %d", ckpt_path, state.step)

    val_batches = (load_validation(cfg, train_days, ranges.validation, device)
                   if ranges.validation else [])

    def checkpoint() -> None:
        if ckpt_path is not None and info.is_main:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint,
                "model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                "rng": _rng_state(), "progress": state.to_state(),
            })

    loop = _Loop(cfg, model, net, optimizer, device, info, state, val_batches, log_fn,
                 checkpoint, on_step, log_every_steps, max_steps, ssim)
    if not state.done:
        loop.run(train_days, ranges.train, progress)
        state.done = True
        checkpoint()
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    if info.owns_group:
        dist.destroy_process_group()
    return TrainResult(
        model=model, n_types=n_types, n_scenarios=n_scenarios, history=state.history,
        samples_per_sec=state.samples / state.seconds if state.seconds else 0.0,
        steps=state.step, best_val=state.best_val, best_step=state.best_step,
        stopped_early=state.stopped_early, resumed_from_step=resumed_from,
        checkpoint_path=ckpt_path, shared_rows=None if ssim is None else ssim.rows_added,
    )


class _Loop:
    """The epoch / step loop, split out of train() to keep each piece small."""

    def __init__(self, cfg: PipelineConfig, model: CVRModel, net: nn.Module,
                 optimizer: torch.optim.Optimizer, device: torch.device, info: DistInfo,
                 state: _Progress, val_batches: list[dict[str, torch.Tensor]],
                 log_fn: LogFn | None, checkpoint: Callable[[], None],
                 on_step: Callable[[int], None] | None, log_every: int,
                 max_steps: int | None, ssim: SharedTraining | None = None) -> None:
        self.cfg, self.model, self.net, self.optimizer = cfg, model, net, optimizer
        self.loss_cfg = loss_config(cfg, model)
        self.device, self.info, self.state = device, info, state
        self.val_batches, self.log_fn, self.checkpoint = val_batches, log_fn, checkpoint
        self.on_step, self.log_every, self.max_steps = on_step, max(1, log_every), max_steps
        self.window_samples, self.window_seconds = 0, 0.0
        self.t_last = time.perf_counter()
        self.ssim = ssim  # SSIM hook (training/ssim.py); None = plain training

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
                    with_impression_id=self.ssim is not None,  # SSIM hook: ids for the lookup
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
        if self.ssim is None:
            p_ctr, p_cvr = self.net(b["features"], b["type_id"], b["scenario_id"])
            loss = global_batch_loss(self.loss_cfg, p_ctr, p_cvr, b, self.info)
        else:
            # SSIM hook (training/ssim.py): the batch's shared instances ride along as extra
            # rows routed to their target domains (one forward) and add their CTCVR loss; a
            # batch without any takes exactly the plain computation above.
            loss = self.ssim.step_loss(self.net, b, self.loss_cfg)
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
            state.best_state = _cpu_state(self.model)
        else:
            state.bad_evals += 1
            if state.bad_evals >= max(1, self.cfg.training.early_stopping_patience):
                state.stopped_early = True
        self._emit(metrics)


# ------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.trainer",
        description="Train a CVR model (MMN by default) on the samples of the given days. "
                    "Run under torchrun for DDP.",
    )
    parser.add_argument("--days", nargs="+", required=True, help="training days, YYYY-MM-DD")
    parser.add_argument("--model-kind", default=None, help="model zoo kind (default: cfg.model.kind)")
    parser.add_argument("--split", choices=["train"], default=None,
                        help="train only on the non-holdout hash buckets (cold start)")
    parser.add_argument("--holdout-fraction", type=float, default=None)
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--output", type=Path, default=None, help="write the final state_dict here")
    parser.add_argument("--max-steps", type=int, default=None)
    add_config_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.config, overrides=args.overrides)
    result = train(cfg, args.days, model_kind=args.model_kind, split=args.split,
                   holdout_fraction=args.holdout_fraction, checkpoint_dir=args.checkpoint_dir,
                   resume=not args.no_resume, progress=not args.no_progress,
                   max_steps=args.max_steps, num_threads=args.threads)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            torch.save(result.model.state_dict(), args.output)
        summary = {"kind": result.model.kind, "steps": result.steps,
                   "samples_per_sec": round(result.samples_per_sec, 1),
                   "n_types": result.n_types, "n_scenarios": result.n_scenarios,
                   "best_step": result.best_step, "stopped_early": result.stopped_early,
                   "best_val": result.best_val}
        json.dump(summary, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
