"""Checkpoints: what identifies a run (its fingerprint), atomic writes, RNG state.

Every ``cfg.training.checkpoint_every_steps`` steps the trainer writes the full state
(model, optimizer, RNG, data position, early-stopping state); a restarted run whose
fingerprint matches resumes from it and ends with the same weights as an uninterrupted run.
A run whose fingerprint differs (other days, config, data, plug-in) starts fresh, and the
log names the keys that differ.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.config import PipelineConfig

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "latest.pt"
# 2: the optimizer has a group of its own for sparse-gradient tables (MMN's wide deltas).
CHECKPOINT_FORMAT = 2


def run_fingerprint(cfg: PipelineConfig, days: Sequence[str], kind: str, split: str | None,
                    holdout_fraction: float | None, n_types: int, n_scenarios: int,
                    world_size: int, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the effective config (its hash), the
    days, the model and split, the domain counts, the world size and the inputs' identity."""
    fingerprint = {"config_hash": cfg.config_hash(), "days": list(days), "kind": kind,
                   "split": split, "holdout_fraction": holdout_fraction, "n_types": n_types,
                   "n_scenarios": n_scenarios, "world_size": world_size}
    if inputs is not None:
        fingerprint["inputs"] = {str(k): v for k, v in sorted(inputs.items())}
    return fingerprint


def fingerprint_mismatch(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two fingerprints (nested ``inputs`` by day)."""
    differ = []
    for key in sorted(set(saved) | set(wanted)):
        old, new = saved.get(key), wanted.get(key)
        if old == new:
            continue
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differ += [f"{key}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        else:
            differ.append(key)
    return differ


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic write (tmp file + rename): a crash mid-write never corrupts the latest one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this very run, else None (logged why)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        log.warning("ignoring checkpoint %s: format %s, not %s; training starts fresh",
                    path, state.get("format"), CHECKPOINT_FORMAT)
        return None
    differ = fingerprint_mismatch(state.get("fingerprint") or {}, fingerprint)
    if differ:
        log.warning("ignoring checkpoint %s: it belongs to a different run (%s differ); "
                    "training starts fresh", path, ", ".join(differ))
        return None
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the weights (best-so-far and checkpoint payloads)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


def day_identity(cfg: PipelineConfig, day: str) -> str:
    """A short hash of one day's training inputs: its build manifest's bytes and its sample
    files (name, size, modification time). Why: a rebuilt or edited day must not resume a
    checkpoint trained on the old rows; hashing the Parquet bytes would cost a full read."""
    digest = hashlib.sha256()
    manifest = cfg.paths.manifest_path(day)
    digest.update(manifest.read_bytes() if manifest.is_file() else b"no manifest")
    samples = cfg.paths.samples_dir(day)
    for path in sorted(samples.rglob("*")) if samples.is_dir() else ():
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(samples)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
