"""Running under torchrun: device choice, the process group, lockstep batches, the global loss.

Why apart from the loop: these are the only pieces that talk to torch.distributed; one
process (world size 1) passes through each of them unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from training.losses import LossOutput, loss_from_config


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """auto -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("training.device=cuda but no CUDA device is available")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


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
