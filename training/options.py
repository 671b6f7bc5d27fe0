"""How one :func:`training.trainer.train` call runs: every knob in one frozen object.

Why: ``train()`` grew to 18 keyword parameters, several only meaningful together; callers
now build (and ``dataclasses.replace``) one value, and a plug-in (``step_loss``) enters
the trainer without the trainer naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.hooks import StepLoss

DEFAULT_MAX_VAL_ROWS = 200_000

LogFn = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class TrainOptions:
    """Options of one training run; the defaults train ``cfg.model.kind`` on whole days.

    ``split="train"`` with ``holdout_fraction`` trains on the non-holdout hash buckets only
    (cold start). ``n_types`` / ``n_scenarios`` default to the vocabulary sizes.
    ``on_step(step)`` runs after each optimizer step (tests inject crashes with it).
    ``num_threads`` sets torch's intra-op threads; None (the default) takes them from the
    thread policy (``runtime.threads``: the usable CPUs divided by ``airflow.parallelism``;
    core.threads).
    ``step_loss`` replaces the plain step loss (training.hooks.StepLoss; e.g. SSIM reuse).
    ``inputs`` identifies inputs beyond the training days (e.g. the holdout day's
    manifest); with the days' own identity (training.checkpoints.day_identity) and the
    config hash it joins the checkpoint fingerprint, so changed data never resumes.
    """

    model_kind: str | None = None
    split: str | None = None
    holdout_fraction: float | None = None
    checkpoint_dir: Path | None = None
    resume: bool = True
    progress: bool = True
    log_fn: LogFn | None = None
    n_types: int | None = None
    n_scenarios: int | None = None
    max_steps: int | None = None
    log_every_steps: int = 50
    max_val_rows: int = DEFAULT_MAX_VAL_ROWS
    on_step: Callable[[int], None] | None = None
    num_threads: int | None = None
    step_loss: StepLoss | None = None
    inputs: Mapping[str, Any] | None = None

