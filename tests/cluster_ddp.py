"""`torchrun` entry point of the cluster test: DDP training whose ranks log to the MLflow server.

Run as ``torchrun --nproc_per_node=2 tests/cluster_ddp.py --run-id R --days D1 D2 --set ...``
with MLFLOW_TRACKING_URI / MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD pointing at the
tracking server. Every rank trains its slice of each global batch (training.trainer under
torchrun) and logs its own counters to run R over HTTP; rank 0 also logs the world size and
the trained weights as an artifact, uploaded through the server's artifact proxy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from mlflow import MlflowClient

from core.config import add_config_arguments, load_config
from training.trainer import TrainOptions, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--days", nargs="+", required=True)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, overrides=args.overrides)
    result = train(cfg, args.days, TrainOptions(resume=False, progress=False, num_threads=1))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    client.log_metric(args.run_id, f"rank{rank}_steps", result.steps)
    client.log_metric(args.run_id, f"rank{rank}_samples_per_sec", result.samples_per_sec)
    if rank == 0:
        client.log_param(args.run_id, "world_size", world)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt"
            torch.save(result.model.state_dict(), path)
            client.log_artifact(args.run_id, str(path), "ddp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
