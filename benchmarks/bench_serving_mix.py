"""One-record serving latency under a realistic domain mix: MMN (composed-tower cache bounded
by bytes) vs DNN, in-process, interleaved so that both see the same machine load.

Each request is one raw impression record from the generator whose domain (conversion type,
display scenario) is drawn from a mix over all N_t x N_s domains:

- ``zipf``: domain of popularity rank k (ranks assigned by a seeded random permutation) with
  probability proportional to k^-s (truncated Zipf over the N_t x N_s domains, s =
  ``--zipf-s``, 1.1 by default: a few domains take most of the traffic, a long tail of small
  ones, as in the MMN paper's and Criteo's logs);
- ``uniform``: every domain equally likely, the cache's worst case short of a scan.

Per (mix, model, cache budget) it reports p50 / p99 of ``ServingModel.predict_records([r])``
(our whole in-process path: hashing, grouping, the model, the answer frame) and of the model
alone (``predict_domain`` on the hashed ids), the composed-tower cache's hit rate and the
bytes it holds. Configurations run in blocks of ``--block`` requests, rotated within each
round, over ``--rounds`` rounds; every configuration replays the same request sequence after
the same warm-up, and the MMN / DNN ratio is also given per round.

    PYTHONPATH=. python benchmarks/bench_serving_mix.py [--budgets 0,16,64,all] [--json out.json]
    PYTHONPATH=. python benchmarks/bench_serving_mix.py --set model.wide=false  # MMN's towers alone
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.config import load_config


def raw_records(cfg, day: str) -> list[dict]:
    records = []
    for path in sorted(cfg.paths.raw_dir("impressions", day).glob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            records.extend(json.loads(line) for line in fh)
    return records


def domain_mix(kind: str, n_domains: int, zipf_s: float, seed: int) -> np.ndarray:
    """Probability of each domain index under the mix."""
    if kind == "uniform":
        return np.full(n_domains, 1.0 / n_domains)
    weights = np.arange(1, n_domains + 1, dtype=float) ** -zipf_s
    probs = np.empty(n_domains)
    probs[np.random.default_rng(seed).permutation(n_domains)] = weights / weights.sum()
    return probs


def requests_for(records: list[dict], cfg, types: list[str], scenarios: list[str], probs: np.ndarray,
                 n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    domains = rng.choice(len(probs), n, p=probs)
    picks = rng.integers(0, len(records), n)
    out = []
    for d, i in zip(domains, picks, strict=True):
        t, s = divmod(int(d), len(scenarios))
        out.append({**records[i], cfg.domains.type_field: types[t], cfg.domains.scenario_field: scenarios[s]})
    return out


def serving_model(cfg, kind: str, types: list[str], scenarios: list[str], budget_mb: float | None):
    from serving.pyfunc import ModelBundle, ServingModel
    from training.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg, len(types), len(scenarios), kind).eval()
    with torch.no_grad():  # untrained weights, but not the zero-initialised domain deltas
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    bundle = ModelBundle(config=cfg.raw, model_kind=kind, n_types=len(types), n_scenarios=len(scenarios),
                         types=types, scenarios=scenarios)
    serving = ServingModel(bundle, model)
    if hasattr(model, "set_predict_cache_budget"):
        model.set_predict_cache_budget(None if budget_mb is None else int(budget_mb * 2**20))
    return serving


def tower_paths(model, domains: list[tuple[int, int]], rounds: int, block: int) -> dict[str, list[float]]:
    """p50 µs per round of MMN's CVR tower alone on one embedded row, three ways: the cached
    composed tower (the served path), composing the tower for each request without keeping
    it, and no composition (the three parameter sets' matmuls, h @ W_shared + h @ W_type[t] +
    h @ W_scenario[s] per layer: no copy at all, three times the weight reads)."""
    import torch.nn.functional as F

    tower = model.cvr_tower
    x = torch.randn(1, tower.dims[0])

    def cached(t: int, s: int) -> torch.Tensor:
        h = x
        layers = model._cached_tower(t, s)
        for i, (w, b) in enumerate(layers):
            h = F.linear(h, w, b)
            h = torch.relu(h) if i < len(layers) - 1 else h
        return h

    def composed(t: int, s: int) -> torch.Tensor:
        h = x
        for i, (w, b) in enumerate(tower.composed(t, s)):
            h = torch.addmm(b, h, w)
            h = torch.relu(h) if i < tower.n_layers - 1 else h
        return h

    def direct(t: int, s: int) -> torch.Tensor:
        h = x
        for i in range(tower.n_layers):
            h = (torch.addmm(tower.bias_shared[i], h, tower.weight_shared[i])
                 + torch.addmm(tower.bias_type[i][t], h, tower.weight_type[i][t])
                 + torch.addmm(tower.bias_scenario[i][s], h, tower.weight_scenario[i][s]))
            h = torch.relu(h) if i < tower.n_layers - 1 else h
        return h

    paths = {"cached composed": cached, "composed per request": composed, "three sets, no composition": direct}
    out: dict[str, list[float]] = {k: [] for k in paths}
    with torch.inference_mode():
        for t, s in domains:
            cached(t, s)  # warm, as the served path is
        for rnd in range(rounds):
            lat: dict[str, list[float]] = {k: [] for k in paths}
            for b, start in enumerate(range(0, len(domains), block)):
                names = list(paths)
                names = names[(b + rnd) % 3:] + names[:(b + rnd) % 3]
                for name in names:
                    for t, s in domains[start:start + block]:
                        t0 = time.perf_counter()
                        paths[name](t, s)
                        lat[name].append(time.perf_counter() - t0)
            for name in paths:
                out[name].append(float(np.percentile(lat[name], 50) * 1e6))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0,16,64,all", help="MMN tower cache budgets, MB (all = no bound)")
    parser.add_argument("--mixes", default="zipf,uniform")
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--requests", type=int, default=3000, help="timed requests per configuration and round")
    parser.add_argument("--warmup", type=int, default=3000, help="requests before timing (cache steady state)")
    parser.add_argument("--block", type=int, default=250, help="requests per interleaved block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--impressions", type=int, default=30000)
    parser.add_argument("--kinds", default="mmn,dnn", help="the first is compared with the last")
    parser.add_argument("--no-tower-paths", action="store_true", help="skip timing the tower alone three ways")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, e.g. model.wide=false (MMN without its wide term)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench-serving-mix-") as tmp:
        env = {**os.environ, "MMN__PATHS__RAW_ROOT": str(Path(tmp) / "raw"),
               "MMN__PATHS__TRUTH_ROOT": str(Path(tmp) / "truth")}
        cfg = load_config(environ=env, overrides=args.set)
        from simulation.generate_logs import generate

        day = cfg.airflow.start_date
        generate(cfg, day, 1, impressions_per_day=args.impressions, fault_rate=0.0)
        records = raw_records(cfg, day)
    types = sorted({r[cfg.domains.type_field] for r in records})
    scenarios = sorted({r[cfg.domains.scenario_field] for r in records})
    n_domains = len(types) * len(scenarios)
    kinds = args.kinds.split(",")
    budgets = [None if b == "all" else float(b) for b in args.budgets.split(",")]
    configs = [(kinds[0], b) for b in budgets] + [(k, None) for k in kinds[1:]]
    models = {c: serving_model(cfg, c[0], types, scenarios, c[1]) for c in configs}
    tower = models[configs[0]].model.cvr_tower
    tower_mb = sum(p.numel() for p in (*tower.weight_shared, *tower.bias_shared)) * 4 / 2**20
    print(f"{len(records)} records, {len(types)} types x {len(scenarios)} scenarios = {n_domains} domains, "
          f"cvr_hidden={list(cfg.model.cvr_hidden)}, wide={cfg.model.wide}, one composed tower "
          f"{tower_mb:.3f} MB (all: {tower_mb * n_domains:.1f} MB), zipf s={args.zipf_s}, 1 torch thread, "
          f"load average {os.getloadavg()}", flush=True)

    results: dict[str, dict] = {}
    for mix in args.mixes.split(","):
        probs = domain_mix(mix, n_domains, args.zipf_s, seed=1)
        top = np.sort(probs)[::-1]
        print(f"\n{mix}: top 10 domains take {top[:10].sum():.1%} of requests, top 50 {top[:50].sum():.1%}",
              flush=True)
        warm = requests_for(records, cfg, types, scenarios, probs, args.warmup, seed=2)
        timed = requests_for(records, cfg, types, scenarios, probs, args.requests, seed=3)
        encoded = {}
        for c, serving in models.items():
            if hasattr(serving.model, "clear_predict_cache"):
                serving.model.clear_predict_cache()
            for r in warm:
                serving.predict_records([r])
            encoded[c] = [serving.encode(r) for r in timed]
        lat = {(c, path): [[] for _ in range(args.rounds)] for c in configs for path in ("records", "model")}
        stats = {c: [0, 0] for c in configs}
        blocks = range(0, args.requests, args.block)
        for rnd in range(args.rounds):
            for b, start in enumerate(blocks):
                order = configs[(b + rnd) % len(configs):] + configs[:(b + rnd) % len(configs)]
                for c in order:
                    serving = models[c]
                    model = serving.model
                    before = (getattr(model, "predict_cache_hits", 0), getattr(model, "predict_cache_misses", 0))
                    sink = lat[(c, "records")][rnd]
                    for r in timed[start:start + args.block]:
                        t0 = time.perf_counter()
                        serving.predict_records([r])
                        sink.append(time.perf_counter() - t0)
                    sink = lat[(c, "model")][rnd]
                    for ids, t, s in encoded[c][start:start + args.block]:
                        t0 = time.perf_counter()
                        model.predict_domain([ids], t, s)
                        sink.append(time.perf_counter() - t0)
                    stats[c][0] += getattr(model, "predict_cache_hits", 0) - before[0]
                    stats[c][1] += getattr(model, "predict_cache_misses", 0) - before[1]
        reference = configs[-1]
        for c in configs:
            name = f"{c[0]}" + ("" if c[0] != kinds[0] else f" cache {'all' if c[1] is None else f'{c[1]:g} MB'}")
            hits, misses = stats[c]
            cached = getattr(models[c].model, "predict_cache_nbytes", 0) / 2**20
            row = {"hit_rate": hits / (hits + misses) if hits + misses else None, "cache_mb": cached}
            text = []
            for path in ("records", "model"):
                every = np.concatenate(lat[(c, path)]) * 1e3
                ratios = [np.percentile(lat[(c, path)][r], 50) / np.percentile(lat[(reference, path)][r], 50)
                          for r in range(args.rounds)]
                row[path] = {"p50_ms": float(np.percentile(every, 50)), "p99_ms": float(np.percentile(every, 99)),
                             "ratio_p50_per_round": [float(x) for x in ratios]}
                text.append(f"{path} p50 {row[path]['p50_ms']:.3f} p99 {row[path]['p99_ms']:.3f} ms "
                            f"(/{reference[0]} {', '.join(f'{x:.2f}' for x in ratios)})")
            hit = "" if row["hit_rate"] is None else f"hits {row['hit_rate']:.1%}, cache {cached:.1f} MB"
            print(f"  {name:<18} {' | '.join(text)}  {hit}", flush=True)
            results[f"{mix}/{name}"] = row
        if not args.no_tower_paths:
            mmn = models[configs[0]].model
            domains = [(e[1], e[2]) for e in encoded[configs[0]]]
            budget = mmn.predict_cache_bytes
            mmn.set_predict_cache_budget(None)  # every domain's tower cached: the best case
            timed_paths = tower_paths(mmn, domains, args.rounds, args.block)
            mmn.set_predict_cache_budget(budget)
            for name, p50s in timed_paths.items():
                print(f"  CVR tower alone, {name:<28} p50 per round {', '.join(f'{x:.1f}' for x in p50s)} µs",
                      flush=True)
                results[f"{mix}/tower/{name}"] = {"p50_us_per_round": p50s}
    print(f"load average at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
