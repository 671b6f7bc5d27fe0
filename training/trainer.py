"""Train a CVR model on a window of days: seeded, checkpointed, resumable, early-stopped.

A validation slice is carved from the training days by the impression_id hash (buckets
next to the holdout's, so the two never overlap) and evaluated every
``cfg.training.eval_every_steps`` steps (training.loop: early stopping, best weights).
Checkpoints (training.checkpoints) make a restarted run with the same inputs end with the
same weights as an uninterrupted one. Under ``torchrun`` each rank trains with DDP
(training.distributed) on its slice of every global batch, with the whole batch's loss.

``train(cfg, days, TrainOptions(...))`` takes one options object; optional stages plug in
through ``TrainOptions.step_loss`` (training.hooks.StepLoss) without the trainer naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from core.config import PipelineConfig, Training, add_config_arguments, load_config
from core.threads import apply_torch_threads, policy_for
from core.vocab import load_vocab
from training.checkpoints import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    cpu_state,
    day_identity,
    load_checkpoint,
    rng_state,
    run_fingerprint,
    save_checkpoint,
    set_rng_state,
)
from training.data import (
    HASH_BUCKETS,
    BucketRange,
    SampleStream,
    batch_to_device,
    count_rows,
    fraction_to_buckets,
)
from training.distributed import DistInfo, global_batch_loss, init_distributed, lockstep, resolve_device
from training.loop import Loop, NonFiniteLossError, Progress, validate
from training.models import CVRModel, build_model, check_capacity, training_config
from training.options import DEFAULT_MAX_VAL_ROWS, LogFn, TrainOptions

log = logging.getLogger(__name__)

# Re-exported: callers import these from training.trainer.
__all__ = [
    "CHECKPOINT_FILE", "DEFAULT_MAX_VAL_ROWS", "DistInfo", "LogFn", "NonFiniteLossError",
    "SliceRanges", "TrainOptions", "TrainResult", "global_batch_loss", "init_distributed",
    "load_validation", "lockstep", "make_optimizer", "parameter_groups", "resolve_device",
    "sparse_gradients_allowed", "split_sparse",
    "slice_ranges", "train", "validate", "vocab_sizes",
]


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
    step_loss_stats: dict[str, float] = field(default_factory=dict)  # the plug-in's counters


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


# --------------------------------------------------------------------------- optimizer


def parameter_groups(cfg: PipelineConfig, model: nn.Module) -> list[dict[str, Any]]:
    """The model's parameters for the optimizer: its domain-specific ones (if it names any)
    in their own group at ``training.domain_lr_scale`` times the learning rate with
    ``training.domain_weight_decay``; the rest with ``training.shared_weight_decay``."""
    domain = list(getattr(model, "domain_parameters", list)())
    training = training_config(cfg, model)
    scale, decay, shared_decay = (training.domain_lr_scale, training.domain_weight_decay,
                                  training.shared_weight_decay)
    if not domain or (scale == 1.0 and decay == shared_decay):
        groups = [{"params": list(model.parameters()), "weight_decay": shared_decay}]
    else:
        ids = {id(p) for p in domain}
        shared = [p for p in model.parameters() if id(p) not in ids]
        groups = [{"params": shared, "weight_decay": shared_decay},
                  {"params": domain, "lr": training.learning_rate * scale, "weight_decay": decay}]
    return split_sparse(groups, list(getattr(model, "sparse_parameters", list)()))


def split_sparse(groups: list[dict[str, Any]], sparse: list[nn.Parameter]) -> list[dict[str, Any]]:
    """Each group's sparse-gradient parameters moved to a group of their own with the same
    settings and no fused kernel (torch's fused Adagrad takes dense gradients only)."""
    if not sparse:
        return groups
    ids = {id(p) for p in sparse}
    out: list[dict[str, Any]] = []
    for group in groups:
        dense = [p for p in group["params"] if id(p) not in ids]
        moved = [p for p in group["params"] if id(p) in ids]
        if moved and group.get("weight_decay", 0.0):
            raise ValueError("sparse gradients take no weight decay: turn them off for this group")
        out += [{**group, "params": dense}] if dense else []
        out += [{**group, "params": moved, "fused": False}] if moved else []
    return out


# torch's sparse Adagrad step builds COO tensors from a coalesced gradient's own indices.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def sparse_gradients_allowed(training: Training, world_size: int) -> bool:
    """Sparse gradients for the models' large domain tables (``CVRModel.sparse_capable_tables``)
    where they give the same numbers as dense ones: Adagrad (its sparse step leaves untouched
    rows as a zero gradient would), no weight decay on the domain parameters, one process
    (DDP's gradient buckets and NCCL take dense gradients)."""
    return training.optimizer == "adagrad" and training.domain_weight_decay == 0 and world_size == 1


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


# ---------------------------------------------------------------------------- train


def train(cfg: PipelineConfig, train_days: Sequence[str], options: TrainOptions | None = None,
          **legacy: Any) -> TrainResult:
    """Train ``options.model_kind`` (default cfg.model.kind) on ``train_days``; see the module
    docstring and :class:`TrainOptions`. Keyword options (``train(cfg, days, max_steps=3)``)
    are still accepted for callers not yet moved to TrainOptions, with a DeprecationWarning."""
    if legacy:
        warnings.warn("train(**kwargs) is deprecated: pass TrainOptions(...)", DeprecationWarning,
                      stacklevel=2)
        options = dataclasses.replace(options or TrainOptions(), **legacy)
    opts = options or TrainOptions()
    if not train_days:
        raise ValueError("train() needs at least one training day")
    train_days = list(train_days)
    # The thread policy (runtime.threads, core.threads); torchrun's local ranks share it.
    policy = policy_for(cfg)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    apply_torch_threads(policy, opts.num_threads if opts.num_threads is not None
                        else max(1, policy.threads // local_ranks))
    info = init_distributed(cfg.training.device)
    hook = opts.step_loss
    if hook is not None and not hook.distributed and info.world_size > 1:
        # Such a loss is weighted by each rank's own batch, not the global one that
        # global_batch_loss reproduces, so it would train a different objective than one
        # process does. Refuse rather than silently diverge.
        raise ValueError(f"{type(hook).__name__} runs single-process only: start training without "
                         f"torchrun (world size here: {info.world_size})")
    device = resolve_device(cfg.training.device, info.local_rank)
    n_types, n_scenarios = opts.n_types, opts.n_scenarios
    if n_types is None or n_scenarios is None:
        vt, vs = vocab_sizes(cfg)
        n_types, n_scenarios = n_types or vt, n_scenarios or vs
    check_capacity(cfg, n_types, n_scenarios)
    kind = opts.model_kind or cfg.model.kind
    ranges = slice_ranges(cfg, train_days, opts.split, opts.holdout_fraction, opts.max_val_rows)

    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg, n_types, n_scenarios, kind).to(device)
    model.use_sparse_gradients(sparse_gradients_allowed(training_config(cfg, model), info.world_size))
    net: nn.Module = model
    if info.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = make_optimizer(cfg, parameter_groups(cfg, model), device, training_config(cfg, model))

    ckpt_path = Path(opts.checkpoint_dir) / CHECKPOINT_FILE if opts.checkpoint_dir else None
    # The training days' identity (manifest + sample files) joins the fingerprint, so a
    # rebuilt or edited day retrains instead of resuming; ``options.inputs`` adds the rest.
    inputs = ({**{d: day_identity(cfg, d) for d in train_days}, **(opts.inputs or {})}
              if ckpt_path is not None else opts.inputs)
    fingerprint = run_fingerprint(cfg, train_days, model.kind, opts.split, opts.holdout_fraction,
                                  n_types, n_scenarios, info.world_size, inputs)
    if hook is not None:
        hook.bind(model)
        fingerprint["step_loss"] = hook.fingerprint()
    state = Progress()
    resumed_from = None
    if ckpt_path is not None and opts.resume:
        saved = load_checkpoint(ckpt_path, fingerprint)
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            set_rng_state(saved["rng"])
            state = Progress.from_state(saved["progress"])
            resumed_from = state.step
            log.info("resumed from %s at step %d", ckpt_path, state.step)

    val_batches = (load_validation(cfg, train_days, ranges.validation, device)
                   if ranges.validation else [])

    def checkpoint() -> None:
        if ckpt_path is not None and info.is_main:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint,
                "model": cpu_state(model), "optimizer": optimizer.state_dict(),
                "rng": rng_state(), "progress": state.to_state(),
            })

    loop = Loop(cfg, model, net, optimizer, device, info, state, val_batches, checkpoint, opts)
    if not state.done:
        loop.run(train_days, ranges.train, opts.progress)
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
        checkpoint_path=ckpt_path, step_loss_stats={} if hook is None else dict(hook.stats()),
    )


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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: the runtime.threads policy)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.config, overrides=args.overrides)
    result = train(cfg, args.days, TrainOptions(
        model_kind=args.model_kind, split=args.split, holdout_fraction=args.holdout_fraction,
        checkpoint_dir=args.checkpoint_dir, resume=not args.no_resume,
        progress=not args.no_progress, max_steps=args.max_steps, num_threads=args.threads))
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
