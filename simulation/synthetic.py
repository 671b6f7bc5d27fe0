"""Synthetic samples in the samples-dataset contract, with a learnable, domain-dependent signal.

Used by tests and benchmarks so they need neither the generator nor the Spark job. CVR
depends on the features through a per-(type, scenario) interaction, so a model that
composes domain parameters (MMN) has something to gain over a single shared tower.
The true probabilities are written as the generator's truth side file.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.config import PipelineConfig
from core.contracts import DOMAIN_COLUMNS
from core.vocab import Vocabulary, save_vocab

MAX_SYNTHETIC_IDS = 64  # small id ranges keep the signal learnable from few rows


def type_names(n: int) -> list[str]:
    return [f"type_{i}" for i in range(n)]


def scenario_names(n: int) -> list[str]:
    return [f"scenario_{i}" for i in range(n)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def make_day(
    cfg: PipelineConfig,
    day: str,
    n_rows: int,
    n_types: int,
    n_scenarios: int,
    seed: int = 0,
    signal_seed: int = 1234,
) -> tuple[pa.Table, pa.Table]:
    """(samples, truth) tables for one day; ``signal_seed`` fixes the true model across days."""
    truth_rng = np.random.default_rng(signal_seed)
    rng = np.random.default_rng([seed, zlib.crc32(day.encode())])
    n_fields = len(cfg.features)
    spans = [min(f.cardinality, MAX_SYNTHETIC_IDS) for f in cfg.features]
    ctr_tables = [truth_rng.normal(0, 0.6, s) for s in spans]
    cvr_tables = [truth_rng.normal(0, 0.5, s) for s in spans]
    interaction = truth_rng.normal(0, 1.2, (n_types, n_scenarios))
    type_bias = truth_rng.normal(0, 0.5, n_types)
    scenario_bias = truth_rng.normal(0, 0.5, n_scenarios)
    type_p = truth_rng.dirichlet(np.full(n_types, 2.0))
    scenario_p = truth_rng.dirichlet(np.full(n_scenarios, 2.0))

    ids = np.stack([rng.integers(1 if s > 1 else 0, s, n_rows) for s in spans], axis=1)
    t = rng.choice(n_types, n_rows, p=type_p)
    s = rng.choice(n_scenarios, n_rows, p=scenario_p)
    ctr_logit = -0.8 + sum(ctr_tables[j][ids[:, j]] for j in range(n_fields))
    cvr_logit = (-0.7 + sum(cvr_tables[j][ids[:, j]] for j in range(n_fields)) + type_bias[t]
                 + scenario_bias[s] + interaction[t, s] * cvr_tables[0][ids[:, 0]] * 3.0)
    p_click, p_conv = _sigmoid(ctr_logit), _sigmoid(cvr_logit)
    click = rng.random(n_rows) < p_click
    conversion = click & (rng.random(n_rows) < p_conv)

    imp = np.array([f"{day}-{i:08d}" for i in range(n_rows)], dtype=object)
    order = np.lexsort((imp, s, t))  # the contract's (type_id, scenario_id, impression_id) order
    ts = np.datetime64(f"{day}T00:00:00", "us") + rng.integers(0, 86_400_000_000, n_rows)
    columns: dict[str, pa.Array] = {
        "impression_id": pa.array(imp[order], pa.string()),
        "ts": pa.array(ts[order], pa.timestamp("us", tz="UTC")),
        "conversion_type": pa.array(np.array(type_names(n_types))[t[order]], pa.string()),
        "display_scenario": pa.array(np.array(scenario_names(n_scenarios))[s[order]], pa.string()),
        DOMAIN_COLUMNS[0]: pa.array(t[order], pa.int32()),
        DOMAIN_COLUMNS[1]: pa.array(s[order], pa.int32()),
    }
    for j, field in enumerate(cfg.features):
        columns[field.column] = pa.array(ids[order, j], pa.int32())
    columns["click"] = pa.array(click[order].astype(np.int32), pa.int32())
    columns["conversion"] = pa.array(conversion[order].astype(np.int32), pa.int32())
    truth = pa.table({"impression_id": pa.array(imp, pa.string()),
                      "p_click": pa.array(p_click), "p_conversion": pa.array(p_conv)})
    return pa.table(columns), truth


def write_day(
    cfg: PipelineConfig,
    day: str,
    samples: pa.Table,
    truth: pa.Table | None = None,
    n_files: int = 2,
    row_group_size: int | None = None,
) -> list[Path]:
    """Write samples as ``n_files`` part files (contiguous slices) and the truth side file."""
    out = cfg.paths.samples_dir(day)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    bounds = np.linspace(0, samples.num_rows, n_files + 1).astype(int)
    for k in range(n_files):
        path = out / f"part-{k:05d}.parquet"
        pq.write_table(samples.slice(bounds[k], bounds[k + 1] - bounds[k]), path,
                       row_group_size=row_group_size)
        paths.append(path)
    if truth is not None:
        cfg.paths.truth_dir(day).mkdir(parents=True, exist_ok=True)
        pq.write_table(truth, cfg.paths.truth_file(day))
    return paths


def write_vocabs(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> None:
    """Persist vocabularies matching the synthetic type / scenario names."""
    for name, values in ((cfg.domains.type_field, type_names(n_types)),
                         (cfg.domains.scenario_field, scenario_names(n_scenarios))):
        save_vocab(cfg.paths.vocab_dir, Vocabulary(name, {v: i for i, v in enumerate(values)}))


def write_days(cfg: PipelineConfig, days: list[str], n_rows: int, n_types: int,
               n_scenarios: int, seed: int = 0, **kwargs: object) -> None:
    """Synthetic samples + truth for every day, and the vocabularies."""
    for day in days:
        samples, truth = make_day(cfg, day, n_rows, n_types, n_scenarios, seed=seed)
        write_day(cfg, day, samples, truth, **kwargs)  # type: ignore[arg-type]
    write_vocabs(cfg, n_types, n_scenarios)


def write_raw_impressions(cfg: PipelineConfig, day: str, n: int, n_types: int,
                          n_scenarios: int, seed: int = 0) -> Path:
    """A few valid raw impression records (JSONL) for ``day``: what training logs as the
    serving model's input example (mmn.tasks.example_records) when there is no generator."""
    import json

    rng = np.random.default_rng([seed, zlib.crc32(day.encode())])
    out = cfg.paths.raw_dir("impressions", day)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "part-00000.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            rec: dict[str, object] = {
                "impression_id": f"{day}-raw-{i:06d}", "ts": f"{day}T12:00:00Z",
                "user_id": f"u{rng.integers(1000)}", "ad_id": f"a{rng.integers(1000)}",
                cfg.domains.type_field: type_names(n_types)[i % n_types],
                cfg.domains.scenario_field: scenario_names(n_scenarios)[(i // n_types) % n_scenarios],
            }
            for field in cfg.features:
                rec[field.name] = (f"{field.name}_{rng.integers(MAX_SYNTHETIC_IDS)}"
                                   if field.kind == "categorical"
                                   else float(rng.uniform(0, 2 * field.boundaries[-1])))
            fh.write(json.dumps(rec) + "\n")
    return path
