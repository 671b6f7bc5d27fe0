"""Saved shared-instance sets: the pairs table and its manifest under ``<lake_root>/ssim/<set_id>/``,
written atomically, listed, loaded exactly as saved, and the validation-chosen ratio recorded."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.config import PipelineConfig

SSIM_DIR = "ssim"
PAIRS_FILE = "pairs.parquet"
MANIFEST_FILE = "manifest.json"
PAIRS_SCHEMA = pa.schema([
    ("impression_id", pa.string()), ("day", pa.string()),
    ("type_id", pa.int32()), ("scenario_id", pa.int32()),  # the TARGET domain
    ("score", pa.float32()), ("shared", pa.bool_()),
])


@dataclass(frozen=True)
class SharedSet:
    """A saved selection: one row per eligible (instance, target domain) pair of the window."""

    set_id: str
    path: Path
    manifest: dict[str, Any]
    pairs: pd.DataFrame  # PAIRS_SCHEMA columns, sorted by (day, impression_id, type, scenario)

    @property
    def chosen_ratio(self) -> float | None:
        """The ratio :func:`record_choice` stored (None: not chosen yet)."""
        value = self.manifest.get("chosen_ratio")
        return None if value is None else float(value)

    def selection(self, ratio: float | None = None) -> pd.DataFrame:
        """Selected pairs (impression_id, day, type_id, scenario_id, score), deterministic:
        ``ratio=None`` = the search's hard mask; else the top floor(ratio * n) pairs by score
        per target domain, ties broken by day then impression id."""
        cols = ["impression_id", "day", "type_id", "scenario_id", "score"]
        if ratio is None:
            return self.pairs.loc[self.pairs["shared"].to_numpy(), cols].reset_index(drop=True)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"share ratio must lie in [0, 1], got {ratio}")
        ranked = self.pairs.sort_values(["type_id", "scenario_id", "score", "day", "impression_id"],
                                        ascending=[True, True, False, True, True], kind="mergesort")
        groups = ranked.groupby(["type_id", "scenario_id"], sort=False)
        size = groups["score"].transform("size").to_numpy()
        keep = groups.cumcount().to_numpy() < np.floor(ratio * size + 1e-9)
        return ranked.loc[keep, cols].reset_index(drop=True)


def ssim_root(cfg: PipelineConfig) -> Path:
    return cfg.paths.lake_root / SSIM_DIR


def domain_names(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> tuple[list[str], list[str]]:
    """Vocabulary names when the vocabularies cover the ids, else the ids as strings."""
    from core.vocab import load_vocab

    names = []
    for field, n in ((cfg.domains.type_field, n_types), (cfg.domains.scenario_field, n_scenarios)):
        try:
            values = load_vocab(cfg.paths.vocab_dir, field).values()
        except (FileNotFoundError, ValueError):
            values = []
        names.append(values if len(values) >= n else [str(i) for i in range(n)])
    return names[0], names[1]


def selection_stats(pairs: pd.DataFrame, types: Sequence[str], scenarios: Sequence[str],
                    ) -> dict[str, Any]:
    """Share of candidate pairs selected, overall and per target domain."""
    per_domain = pairs.groupby(["type_id", "scenario_id"], sort=True)["shared"].agg(["mean", "size"])
    return {
        "n_candidates": int(len(pairs)),
        "n_shared": int(pairs["shared"].sum()),
        "selection_ratio": float(pairs["shared"].mean()) if len(pairs) else 0.0,
        "selection_ratio_per_domain": {f"{types[t]}/{scenarios[s]}": float(row["mean"])
                                       for (t, s), row in per_domain.iterrows()},
        "candidates_per_domain": {f"{types[t]}/{scenarios[s]}": int(row["size"])
                                  for (t, s), row in per_domain.iterrows()},
    }


def save_shared_set(cfg: PipelineConfig, pairs: pd.DataFrame, manifest: dict[str, Any]) -> SharedSet:
    """Write pairs + manifest into a temp folder, then rename: readers never see half a set."""
    root = ssim_root(cfg)
    final = root / manifest["set_id"]
    if final.exists():
        raise FileExistsError(f"shared set {final} already exists")
    tmp = root / f".{manifest['set_id']}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    table = pa.Table.from_pandas(pairs, schema=PAIRS_SCHEMA, preserve_index=False)
    pq.write_table(table, tmp / PAIRS_FILE)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, final)
    return SharedSet(manifest["set_id"], final, manifest, pairs)


def list_shared_sets(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Manifests of the saved sets, oldest first."""
    root = ssim_root(cfg)
    found = [json.loads(p.read_text()) for p in sorted(root.glob(f"*/{MANIFEST_FILE}"))
             if not p.parent.name.startswith(".")] if root.is_dir() else []
    return sorted(found, key=lambda m: (m["created_at"], m["set_id"]))


def load_shared_set(cfg: PipelineConfig, set_id: str | None = None) -> SharedSet:
    """A saved set (None = the latest), exactly as saved (same pairs, same selection)."""
    if set_id is None:
        sets = list_shared_sets(cfg)
        if not sets:
            raise FileNotFoundError(f"no SSIM shared set under {ssim_root(cfg)}: run the search first")
        set_id = sets[-1]["set_id"]
    path = ssim_root(cfg) / set_id
    if not (path / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"no SSIM shared set {set_id!r} under {ssim_root(cfg)}")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    pairs = pq.read_table(path / PAIRS_FILE, schema=PAIRS_SCHEMA).to_pandas()
    return SharedSet(set_id, path, manifest, pairs)


def record_choice(cfg: PipelineConfig, set_id: str, ratio: float, table: pd.DataFrame,
                  metric: str, day: str | None = None) -> SharedSet:
    """Store the validation-chosen ratio (its table, the day it was chosen for) in the set's
    manifest, atomically."""
    shared = load_shared_set(cfg, set_id)
    manifest = {**shared.manifest, "chosen_ratio": float(ratio), "ratio_metric": metric,
                "chosen_for_day": day,
                "ratio_table": json.loads(table.reset_index().to_json(orient="records"))}
    tmp = shared.path / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, shared.path / MANIFEST_FILE)
    return dataclasses.replace(shared, manifest=manifest)
