"""Training throughput and serving latency: DNN vs naive MMN vs fast MMN (or every model kind).

Training: samples/s of full steps (forward, dynamic-weight loss, backward, optimizer step)
on synthetic batches with the configured model sizes, at several (types x scenarios)
shapes. Domains are drawn from a skewed (Dirichlet) mix, as real traffic is, so some are
absent from a batch. Serving: single-request latency of ``predict_domain`` (p50 / p99).

    PYTHONPATH=. python benchmarks/bench_mmn_training.py [--shapes 19x8,21x17] [--json out.json]
    PYTHONPATH=. python benchmarks/bench_mmn_training.py --variants all --no-predict
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from core.config import PipelineConfig, load_config
from training.losses import loss_from_config
from training.models import build_model, loss_config, training_config
from training.trainer import make_optimizer, parameter_groups, resolve_device, sparse_gradients_allowed


def synthetic_batch(cfg: PipelineConfig, n_types: int, n_scenarios: int, batch_size: int,
                    seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    domain_p = np.random.default_rng(0).dirichlet(np.full(n_types * n_scenarios, 0.7))
    domains = rng.choice(n_types * n_scenarios, batch_size, p=domain_p)
    feats = np.stack([rng.integers(0, f.cardinality, batch_size) for f in cfg.features], 1)
    click = rng.random(batch_size) < 0.1
    batch = {
        "features": torch.from_numpy(feats),
        "type_id": torch.from_numpy(domains // n_scenarios),
        "scenario_id": torch.from_numpy(domains % n_scenarios),
        "click": torch.from_numpy(click.astype(np.float32)),
        "conversion": torch.from_numpy((click & (rng.random(batch_size) < 0.2)).astype(np.float32)),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class TrainRunner:
    """One model + optimizer + fixed batches; ``run(k)`` times k full training steps."""

    def __init__(self, cfg: PipelineConfig, kind: str, naive: bool, n_types: int,
                 n_scenarios: int, device: torch.device, dense_grads: bool = False) -> None:
        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        self.model = build_model(cfg, n_types, n_scenarios, kind).to(device).train()
        # The trainer's policy (sparse gradients for large domain tables where allowed).
        self.model.use_sparse_gradients(not dense_grads and sparse_gradients_allowed(
            training_config(cfg, self.model), world_size=1))
        self.forward: Callable = self.model.forward_naive if naive else self.model.forward  # type: ignore
        self.opt = make_optimizer(cfg, parameter_groups(cfg, self.model), device)
        self.batches = [synthetic_batch(cfg, n_types, n_scenarios, cfg.training.batch_size, s, device)
                        for s in range(4)]
        self.times: list[float] = []
        self.i = 0

    def run(self, steps: int, record: bool = True) -> None:
        for _ in range(steps):
            b = self.batches[self.i % len(self.batches)]
            self.i += 1
            _sync(self.device)
            start = time.perf_counter()
            p_ctr, p_cvr = self.forward(b["features"], b["type_id"], b["scenario_id"])
            loss = loss_from_config(loss_config(self.cfg, self.model), p_ctr, p_cvr, b).total
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            _sync(self.device)
            if record:
                self.times.append(time.perf_counter() - start)

    def summary(self) -> dict[str, float]:
        step_s = statistics.median(self.times)
        return {"samples_per_sec": self.cfg.training.batch_size / step_s, "step_ms": step_s * 1e3,
                "best_step_ms": min(self.times) * 1e3, "timed_steps": float(len(self.times)),
                "params": float(sum(p.numel() for p in self.model.parameters())),
                "domain_param_sets": float(self.model.n_domain_param_sets)}


def predict_latency(cfg: PipelineConfig, kind: str, n_types: int, n_scenarios: int,
                    requests: int, rows: int, device: torch.device) -> dict[str, float]:
    """p50 / p99 ms of predict_domain for requests of ``rows`` candidates, random domains."""
    torch.manual_seed(0)
    model = build_model(cfg, n_types, n_scenarios, kind).to(device).eval()
    rng = np.random.default_rng(1)
    feats = torch.from_numpy(np.stack([rng.integers(0, f.cardinality, rows) for f in cfg.features], 1))
    for t in range(n_types):  # warm the composed-weight cache, as a running server would be
        for s in range(n_scenarios):
            model.predict_domain(feats, t, s)
    lat = []
    domains = rng.integers(0, [n_types, n_scenarios], (requests, 2))
    for t, s in domains:
        _sync(device)
        start = time.perf_counter()
        model.predict_domain(feats, int(t), int(s))
        _sync(device)
        lat.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def training_variant(name: str) -> tuple[str, str, bool, bool]:
    """(name, model kind, naive?, dense gradients?): ``mmn_naive`` / ``mmn_fast`` are MMN's two
    forward paths, ``mmn_dense`` the fast path with dense gradients for the wide term's domain
    tables (the lever's baseline); any other name is a registered model kind (``all`` is
    expanded by the caller)."""
    from training.models import MODEL_REGISTRY

    if name in ("mmn_naive", "mmn_fast", "mmn_dense"):
        return name, "mmn", name == "mmn_naive", name == "mmn_dense"
    if name not in MODEL_REGISTRY:
        raise SystemExit(f"unknown variant {name!r}: mmn_naive, mmn_fast, mmn_dense or one of "
                         f"{sorted(MODEL_REGISTRY)}")
    return name, name, False, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="19x8,21x17", help="comma list of TYPESxSCENARIOS")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round (fast models)")
    parser.add_argument("--naive-steps", type=int, default=1, help="timed steps per round (naive MMN)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: stable on a shared, contended box)")
    parser.add_argument("--requests", type=int, default=2000, help="predict requests per model")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--variants", default="dnn,mmn_naive,mmn_fast,mmn_common_only",
                        help="training variants to time (comma list): mmn_naive, mmn_fast, any model "
                             "kind, or 'all' (every registered kind)")
    parser.add_argument("--no-predict", action="store_true", help="skip the predict_domain latencies")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.variants == "all":
        from training.models import MODEL_REGISTRY

        args.variants = ",".join(sorted(MODEL_REGISTRY))
    cfg = load_config(overrides=args.set)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"device={device} threads={torch.get_num_threads()} batch={cfg.training.batch_size} "
          f"cvr_hidden={list(cfg.model.cvr_hidden)} load_avg={os.getloadavg()[0]:.2f}")
    results: dict[str, dict] = {"train": {}, "predict": {}}
    variants = [training_variant(name) for name in args.variants.split(",")]
    for n_types, n_scenarios in shapes:
        shape = f"{n_types}x{n_scenarios}"
        runners = {name: TrainRunner(cfg, kind, naive, n_types, n_scenarios, device, dense)
                   for name, kind, naive, dense in variants}
        for name, runner in runners.items():
            runner.run(1 if name == "mmn_naive" else args.warmup, record=False)
        for _ in range(args.rounds):  # interleaved, so background load hits every variant alike
            for name, runner in runners.items():
                runner.run(args.naive_steps if name == "mmn_naive" else args.steps)
        for name, runner in runners.items():
            r = runner.summary()
            results["train"][f"{shape}/{name}"] = r
            print(f"train {shape:>6} {name:<16} {r['samples_per_sec']:>9,.0f} samples/s "
                  f"(median {r['step_ms']:8.1f} ms/step, best {r['best_step_ms']:8.1f}, "
                  f"{r['params'] / 1e6:5.1f}M params)", flush=True)
        del runners
        for name, kind in () if args.no_predict else (("dnn", "dnn"), ("mmn", "mmn")):
            for rows in (1, 64):
                r = predict_latency(cfg, kind, n_types, n_scenarios, args.requests, rows, device)
                results["predict"][f"{shape}/{name}/rows{rows}"] = r
                print(f"predict {shape:>6} {name:<4} rows={rows:<3} p50 {r['p50_ms']:.3f} ms  "
                      f"p99 {r['p99_ms']:.3f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
