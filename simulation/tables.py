"""One chunk of simulated events as the three logs' tables (impressions, clicks,
conversions), every field name and id prefix taken from the config (the raw-log contract).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from core.config import PipelineConfig
from simulation.columns import (
    NATURALLY_MISSING,
    SEMANTIC_FIELDS,
    id_strings,
    ms_timestamps,
    name_strings,
    with_nulls,
)
from simulation.presets import N_GENERIC_VALUES
from simulation.world import Events, World, ZipfSampler

FEATURE_MISSING_RATE = 0.01


def _generic_field(world: World, name: str, kind: str, rng: np.random.Generator, n: int) -> pa.Array:
    """Values for a configured field the world has no meaning for (no label effect)."""
    if kind == "categorical":
        sampler = world.generic.get(name) or ZipfSampler.build(N_GENERIC_VALUES, 1.0, rng)
        return id_strings(f"{name}_", sampler.sample(rng, n))
    return pa.array(np.round(rng.lognormal(0.0, 1.0, n), 3), pa.float64())


@dataclass(frozen=True)
class DayNames:
    """Field names and id prefixes of one impression day, all taken from the config."""

    imp_id: str
    click_id: str
    conv_id: str
    type_field: str
    scenario_field: str
    tag: str  # YYYYMMDD

    @classmethod
    def of(cls, cfg: PipelineConfig, day: dt.date) -> DayNames:
        return cls(
            imp_id=cfg.logs["impressions"].id_field,
            click_id=cfg.logs["clicks"].id_field,
            conv_id=cfg.logs["conversions"].id_field,
            type_field=cfg.domains.type_field,
            scenario_field=cfg.domains.scenario_field,
            tag=day.strftime("%Y%m%d"),
        )


def impression_table(cfg: PipelineConfig, world: World, ev: Events, names: DayNames,
                     first_index: int, rng: np.random.Generator) -> pa.Table:
    """Impression records: required fields in config order, then the remaining features."""
    n = len(ev.ts)
    cols: dict[str, pa.Array] = {}
    for name, kind in cfg.logs["impressions"].required.items():
        if kind == "timestamp":
            cols[name] = ms_timestamps(ev.ts)
        elif name == names.imp_id:
            cols[name] = id_strings(f"imp-{names.tag}-", np.arange(first_index, first_index + n), 9)
        elif name == names.type_field:
            cols[name] = name_strings(world.preset.types, ev.type_idx)
        elif name == names.scenario_field:
            cols[name] = name_strings(world.preset.scenarios, ev.scenario_idx)
        elif name in SEMANTIC_FIELDS:
            cols[name] = SEMANTIC_FIELDS[name](world, ev)
        else:
            cols[name] = _generic_field(world, name, "categorical", rng, n)
    for feature in cfg.features:
        if feature.name in cols:
            continue
        if feature.name in SEMANTIC_FIELDS:
            values = SEMANTIC_FIELDS[feature.name](world, ev)
        else:
            values = _generic_field(world, feature.name, feature.kind, rng, n)
        if feature.name not in NATURALLY_MISSING:
            values = with_nulls(values, rng.random(n) < FEATURE_MISSING_RATE)
        cols[feature.name] = values
    return pa.table(cols)


def click_table(ev: Events, names: DayNames, imp_ids: pa.Array, first_click: int) -> pa.Table:
    k = len(ev.click_ts)
    return pa.table({
        names.click_id: id_strings(f"clk-{names.tag}-", np.arange(first_click, first_click + k), 9),
        names.imp_id: imp_ids.take(pa.array(ev.click_imp)),
        "ts": ms_timestamps(ev.click_ts),
    })


def conversion_table(ev: Events, names: DayNames, click_ids: pa.Array, first_conv: int) -> pa.Table:
    """Conversions plus a helper ``_click_ts`` column (dropped before writing)."""
    m = len(ev.conv_ts)
    return pa.table({
        names.conv_id: id_strings(f"cnv-{names.tag}-", np.arange(first_conv, first_conv + m), 9),
        names.click_id: click_ids.take(pa.array(ev.conv_click)),
        "ts": ms_timestamps(ev.conv_ts),
        "_click_ts": pa.array(ev.click_ts[ev.conv_click], pa.int64()),
    })
