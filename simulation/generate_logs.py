"""Deterministic raw-log generator: impressions, clicks and conversions for a date range.

Why it exists: the pipeline needs multi-domain logs whose labels depend on the domain
(conversion type x display scenario) in ways a single shared network fits worse than
per-domain parameters, with a known ground truth to report oracle AUC, and with
realistic defects to exercise the Spark job's quarantine. Everything is seeded: a day's
logs depend only on (config, preset, seed, day), never on the date range asked for.

Layout written (the raw-log contract, README "Raw-log contract"):
``<raw_root>/<log>/dt=P/part-<k>.<ext>`` where ``k = P - impression day``: clicks and
conversions of day D's impressions that land on a later day P go to that day's partition
under their own file name, so generating day D never clobbers what day D-1 wrote there.
True probabilities go to ``cfg.paths.truth_file(D)``, never into the logs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import math
import re
import zlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.config import PipelineConfig, add_config_arguments, load_config

DAY_MS = 86_400_000
CHUNK_ROWS = 250_000  # impressions simulated and written per step: bounds memory at any scale
FORMATS = ("jsonl", "jsonl.gz", "parquet")
LOGS = ("impressions", "clicks", "conversions")
GZIP_LEVEL = 3  # speed over size: level 6 triples the generator's wall time

# Event timing. Shares "in window" are also folded into the truth probabilities, so the
# truth file gives P(label = 1) exactly as the build job defines the label.
CLICK_IN_WINDOW = 0.97
CLICK_DELAY_MEAN_MS = 120_000
LATE_CLICK_MAX_MS = 4 * 3_600_000
REPEAT_CLICK_RATE = 0.03
REPEAT_CLICK_MAX_MS = 1_800_000
CONV_IN_WINDOW = 0.95
CONV_DELAY_MEAN_MS = 10 * 3_600_000
LATE_CONV_MAX_MS = 24 * 3_600_000

FEATURE_MISSING_RATE = 0.01
AGE_MISSING_RATE = 0.03
OS_NAMES = ("android", "ios", "windows", "macos", "linux", "harmonyos")
OS_SHARE = (0.50, 0.30, 0.08, 0.06, 0.03, 0.03)
AGE_EDGES = (25.0, 35.0, 45.0, 55.0)  # the world's age groups (5) plus one for "unknown"
N_CATEGORIES = 60
N_GENERIC_VALUES = 50


# ---------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """Domain names and base rates of one synthetic world (names obey the value pattern)."""

    name: str
    types: tuple[str, ...]
    type_cvr: tuple[float, ...]
    scenarios: tuple[str, ...]
    scenario_cvr: tuple[float, ...]
    scenario_ctr: tuple[float, ...]


def _geom(lo: float, hi: float, n: int) -> tuple[float, ...]:
    return tuple(float(x) for x in np.geomspace(lo, hi, n))


def _shuffled(values: tuple[float, ...], seed: int) -> tuple[float, ...]:
    return tuple(float(x) for x in np.random.default_rng(seed).permutation(values))


# Ordered from the lowest to the highest base CVR.
_NEWSFEED_TYPES = (
    "purchase", "checkout", "subscribe", "trial_start", "reservation", "call",
    "app_activation", "lead", "registration", "signup", "app_install", "download",
    "add_to_cart", "message", "form", "search", "retention", "content_view", "page_view",
)
_NEWSFEED_SCENARIOS = (
    "banner", "news_feed", "video", "splash", "search_result", "feed_detail",
    "interstitial", "native_card",
)

PRESETS: dict[str, Preset] = {
    "newsfeed": Preset(
        name="newsfeed",
        types=_NEWSFEED_TYPES,
        type_cvr=_geom(0.0005, 0.276, len(_NEWSFEED_TYPES)),
        scenarios=_NEWSFEED_SCENARIOS,
        scenario_cvr=_shuffled(_geom(0.016, 0.041, len(_NEWSFEED_SCENARIOS)), 1),
        scenario_ctr=(0.012, 0.045, 0.03, 0.02, 0.07, 0.05, 0.015, 0.035),
    ),
    "criteo": Preset(
        name="criteo",
        types=tuple(f"type_{i:02d}" for i in range(21)),
        type_cvr=_shuffled(_geom(0.063, 0.189, 21), 2),
        scenarios=tuple(f"scenario_{i:02d}" for i in range(17)),
        scenario_cvr=_shuffled(_geom(0.009, 0.149, 17), 3),
        scenario_ctr=_shuffled(_geom(0.01, 0.08, 17), 4),
    ),
}


# ---------------------------------------------------------------- the synthetic world


@dataclass(frozen=True)
class ZipfSampler:
    """Power-law popularity over n items, ranks randomly assigned to item ids."""

    cdf: np.ndarray
    perm: np.ndarray

    @classmethod
    def build(cls, n: int, exponent: float, rng: np.random.Generator) -> ZipfSampler:
        weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
        cdf = np.cumsum(weights)
        return cls(cdf=cdf / cdf[-1], perm=rng.permutation(n))

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        rank = np.searchsorted(self.cdf, rng.random(size), side="right")
        return self.perm[np.minimum(rank, len(self.cdf) - 1)]


@dataclass(frozen=True)
class World:
    """Users, ads and the label model; fixed across days so the days share one truth."""

    preset: Preset
    users: ZipfSampler
    user_os: np.ndarray
    user_age: np.ndarray  # NaN = unknown
    user_affinity: np.ndarray
    ads: ZipfSampler
    ad_type: np.ndarray
    ad_advertiser: np.ndarray
    ad_category: np.ndarray
    ad_bid: np.ndarray
    ad_quality: np.ndarray
    advertiser_effect: np.ndarray
    scenario_cdf: np.ndarray  # (types, scenarios): P(scenario | type), some pairs empty
    ctr_scenario: np.ndarray
    ctr_scenario_os: np.ndarray
    ctr_category: np.ndarray
    cvr_type: np.ndarray
    cvr_scenario: np.ndarray
    cvr_type_category: np.ndarray
    cvr_type_age: np.ndarray
    cvr_scenario_os: np.ndarray
    generic: dict[str, ZipfSampler]


def _logit(p: Sequence[float]) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    return np.log(arr / (1.0 - arr))


def _centered(rng: np.random.Generator, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """Per-row zero-mean effects, so a domain's base rate stays its base rate."""
    effects = rng.normal(0.0, scale, shape)
    return effects - effects.mean(axis=1, keepdims=True)


def _domain_mix(preset: Preset, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Skewed type shares and P(scenario | type) with some pairs rare (3%) or empty."""
    n_t, n_s = len(preset.types), len(preset.scenarios)
    type_w = 1.0 / (1.0 + rng.permutation(n_t)) ** 1.1
    scen_w = 1.0 / (1.0 + rng.permutation(n_s)) ** 0.8
    u = rng.random((n_t, n_s))
    mult = np.where(u < 0.12, 0.0, np.where(u < 0.30, 0.03, 1.0))
    mult[np.arange(n_t), rng.integers(n_s, size=n_t)] = 1.0  # every type shows somewhere
    mult[rng.integers(n_t, size=n_s), np.arange(n_s)] = 1.0  # every scenario is used
    pair = scen_w[None, :] * mult
    cdf = np.cumsum(pair, axis=1)
    return type_w / type_w.sum(), cdf / cdf[:, -1:]


def build_world(cfg: PipelineConfig, preset: Preset, seed: int) -> World:
    """The fixed population and label model of a (preset, seed)."""
    rng = np.random.default_rng(
        np.random.SeedSequence([seed, zlib.crc32(preset.name.encode()), cfg.generator.users, cfg.generator.ads])
    )
    n_t, n_s, n_os = len(preset.types), len(preset.scenarios), len(OS_NAMES)
    n_users, n_ads = max(1, cfg.generator.users), max(1, cfg.generator.ads)
    type_share, scenario_cdf = _domain_mix(preset, rng)

    ad_type = rng.choice(n_t, size=n_ads, p=type_share)
    ad_type[: min(n_t, n_ads)] = np.arange(min(n_t, n_ads))  # every type has an ad
    n_advertisers = max(1, n_ads // 8)
    age = np.round(np.clip(18.0 + rng.gamma(2.0, 11.0, n_users), 13.0, 90.0))
    age[rng.random(n_users) < AGE_MISSING_RATE] = np.nan
    generic = {
        f.name: ZipfSampler.build(N_GENERIC_VALUES, 1.0, rng)
        for f in cfg.features
        if f.kind == "categorical" and f.name not in _SEMANTIC
    }
    return World(
        preset=preset,
        users=ZipfSampler.build(n_users, 1.1, rng),
        user_os=rng.choice(n_os, size=n_users, p=OS_SHARE),
        user_age=age,
        user_affinity=rng.normal(0.0, 0.5, n_users),
        ads=ZipfSampler.build(n_ads, 1.05, rng),
        ad_type=ad_type,
        ad_advertiser=ZipfSampler.build(n_advertisers, 1.0, rng).sample(rng, n_ads),
        ad_category=ZipfSampler.build(N_CATEGORIES, 0.9, rng).sample(rng, n_ads),
        ad_bid=np.round(np.maximum(rng.lognormal(np.log(0.4), 0.9, n_ads), 0.01), 4),
        ad_quality=rng.normal(0.0, 0.35, n_ads),
        advertiser_effect=rng.normal(0.0, 0.3, n_advertisers),
        scenario_cdf=scenario_cdf,
        ctr_scenario=_logit(preset.scenario_ctr),
        ctr_scenario_os=_centered(rng, 0.35, (n_s, n_os)),
        ctr_category=rng.normal(0.0, 0.3, N_CATEGORIES),
        cvr_type=_logit(preset.type_cvr),
        cvr_scenario=_logit(preset.scenario_cvr) - _logit(preset.scenario_cvr).mean(),
        cvr_type_category=_centered(rng, 0.7, (n_t, N_CATEGORIES)),
        cvr_type_age=_centered(rng, 0.6, (n_t, len(AGE_EDGES) + 2)),
        cvr_scenario_os=_centered(rng, 0.5, (n_s, n_os)),
        generic=generic,
    )


# ---------------------------------------------------------------- simulation


@dataclass(frozen=True)
class Events:
    """One chunk of simulated impressions with their clicks and conversions (numpy)."""

    ts: np.ndarray
    user: np.ndarray
    ad: np.ndarray
    type_idx: np.ndarray
    scenario_idx: np.ndarray
    p_click: np.ndarray  # P(click label = 1)
    p_conversion: np.ndarray  # P(conversion label = 1 | click label = 1)
    click_imp: np.ndarray  # impression row of each click (first clicks, then repeats)
    click_ts: np.ndarray
    conv_click: np.ndarray  # click row of each conversion
    conv_ts: np.ndarray


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _truncated_exp(rng: np.random.Generator, mean_ms: float, max_ms: int, size: int) -> np.ndarray:
    """Delays in [0, max_ms): exponential with the given mean, cut at the window."""
    u = rng.random(size)
    return np.floor(-mean_ms * np.log1p(-u * (1.0 - math.exp(-max_ms / mean_ms)))).astype(np.int64)


def simulate(world: World, rng: np.random.Generator, n: int, t0: int, t1: int,
             click_window_ms: int, attribution_ms: int) -> Events:
    """Impressions in [t0, t1) ms, their click and conversion outcomes and times."""
    ts = np.sort(rng.integers(t0, max(t1, t0 + 1), size=n, dtype=np.int64))
    user = world.users.sample(rng, n)
    ad = world.ads.sample(rng, n)
    t = world.ad_type[ad]
    s = (rng.random(n)[:, None] > world.scenario_cdf[t]).sum(axis=1)
    os_idx = world.user_os[user]
    age = world.user_age[user]
    age_group = np.where(np.isnan(age), len(AGE_EDGES) + 1, np.searchsorted(AGE_EDGES, age, side="right"))
    cat = world.ad_category[ad]
    ctr_logit = (world.ctr_scenario[s] + world.ctr_scenario_os[s, os_idx] + world.ctr_category[cat]
                 + 0.5 * world.user_affinity[user] + world.ad_quality[ad] + 0.1 * np.log(world.ad_bid[ad]))
    cvr_logit = (world.cvr_type[t] + world.cvr_scenario[s] + world.cvr_type_category[t, cat]
                 + world.cvr_type_age[t, age_group] + world.cvr_scenario_os[s, os_idx]
                 + 0.4 * world.user_affinity[user] + world.advertiser_effect[world.ad_advertiser[ad]]
                 + 0.3 * world.ad_quality[ad])
    p_click_raw, p_conv_raw = _sigmoid(ctr_logit), _sigmoid(cvr_logit)

    first = np.flatnonzero(rng.random(n) < p_click_raw)
    k = len(first)
    in_window = rng.random(k) < CLICK_IN_WINDOW
    delay = np.where(in_window, _truncated_exp(rng, CLICK_DELAY_MEAN_MS, click_window_ms, k),
                     click_window_ms + rng.integers(60_000, LATE_CLICK_MAX_MS, size=k))
    first_ts = ts[first] + delay
    repeat = np.flatnonzero(rng.random(k) < REPEAT_CLICK_RATE)
    repeat_ts = first_ts[repeat] + rng.integers(10_000, REPEAT_CLICK_MAX_MS, size=len(repeat))

    converted = np.flatnonzero(rng.random(k) < p_conv_raw[first])
    m = len(converted)
    v_in = rng.random(m) < CONV_IN_WINDOW
    v_delay = np.where(v_in, _truncated_exp(rng, CONV_DELAY_MEAN_MS, attribution_ms, m),
                       attribution_ms + rng.integers(60_000, LATE_CONV_MAX_MS, size=m))
    return Events(
        ts=ts, user=user, ad=ad, type_idx=t, scenario_idx=s,
        p_click=p_click_raw * CLICK_IN_WINDOW, p_conversion=p_conv_raw * CONV_IN_WINDOW,
        click_imp=np.concatenate([first, first[repeat]]),
        click_ts=np.concatenate([first_ts, repeat_ts]),
        conv_click=converted, conv_ts=first_ts[converted] + v_delay,
    )


# ---------------------------------------------------------------- columns (pyarrow)


def _ids(prefix: str, numbers: np.ndarray, width: int = 0) -> pa.Array:
    """Vectorized ``f"{prefix}{n:0{width}d}"``."""
    text = pc.cast(pa.array(np.asarray(numbers, dtype=np.int64)), pa.string())
    if width:
        text = pc.utf8_lpad(text, width=width, padding="0")
    return pc.binary_join_element_wise(prefix, text, "")


def _names(names: Sequence[str], idx: np.ndarray) -> pa.Array:
    return pa.array(list(names), pa.string()).take(pa.array(np.asarray(idx, dtype=np.int64)))


def _with_nulls(arr: pa.Array, mask: np.ndarray) -> pa.Array:
    if not mask.any():
        return arr
    return pc.if_else(pa.array(mask), pa.scalar(None, arr.type), arr)


def _timestamps(ms: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(ms, dtype=np.int64), pa.timestamp("ms", tz="UTC"))


_SEMANTIC: dict[str, Callable[[World, Events], pa.Array]] = {
    "user_id": lambda w, e: _ids("u", e.user),
    "ad_id": lambda w, e: _ids("a", e.ad),
    "advertiser_id": lambda w, e: _ids("adv", w.ad_advertiser[e.ad]),
    "ad_category": lambda w, e: _ids("cat_", w.ad_category[e.ad], 2),
    "device_os": lambda w, e: _names(OS_NAMES, w.user_os[e.user]),
    "user_age": lambda w, e: pa.array(w.user_age[e.user], pa.float64(), from_pandas=True),
    "bid_price": lambda w, e: pa.array(w.ad_bid[e.ad], pa.float64()),
}
_NATURALLY_MISSING = {"user_age"}


def _generic_field(world: World, name: str, kind: str, rng: np.random.Generator, n: int) -> pa.Array:
    """Values for a configured field the world has no meaning for (no label effect)."""
    if kind == "categorical":
        sampler = world.generic.get(name) or ZipfSampler.build(N_GENERIC_VALUES, 1.0, rng)
        return _ids(f"{name}_", sampler.sample(rng, n))
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
            cols[name] = _timestamps(ev.ts)
        elif name == names.imp_id:
            cols[name] = _ids(f"imp-{names.tag}-", np.arange(first_index, first_index + n), 9)
        elif name == names.type_field:
            cols[name] = _names(world.preset.types, ev.type_idx)
        elif name == names.scenario_field:
            cols[name] = _names(world.preset.scenarios, ev.scenario_idx)
        elif name in _SEMANTIC:
            cols[name] = _SEMANTIC[name](world, ev)
        else:
            cols[name] = _generic_field(world, name, "categorical", rng, n)
    for feature in cfg.features:
        if feature.name in cols:
            continue
        if feature.name in _SEMANTIC:
            values = _SEMANTIC[feature.name](world, ev)
        else:
            values = _generic_field(world, feature.name, feature.kind, rng, n)
        if feature.name not in _NATURALLY_MISSING:
            values = _with_nulls(values, rng.random(n) < FEATURE_MISSING_RATE)
        cols[feature.name] = values
    return pa.table(cols)


def click_table(ev: Events, names: DayNames, imp_ids: pa.Array, first_click: int) -> pa.Table:
    k = len(ev.click_ts)
    return pa.table({
        names.click_id: _ids(f"clk-{names.tag}-", np.arange(first_click, first_click + k), 9),
        names.imp_id: imp_ids.take(pa.array(ev.click_imp)),
        "ts": _timestamps(ev.click_ts),
    })


def conversion_table(ev: Events, names: DayNames, click_ids: pa.Array, first_conv: int) -> pa.Table:
    """Conversions plus a helper ``_click_ts`` column (dropped before writing)."""
    m = len(ev.conv_ts)
    return pa.table({
        names.conv_id: _ids(f"cnv-{names.tag}-", np.arange(first_conv, first_conv + m), 9),
        names.click_id: click_ids.take(pa.array(ev.conv_click)),
        "ts": _timestamps(ev.conv_ts),
        "_click_ts": pa.array(ev.click_ts[ev.conv_click], pa.int64()),
    })


# ---------------------------------------------------------------- JSON lines (vectorized)

_NEEDS_ESCAPE = r'["\\\x00-\x1f\x7f]'


def _needs_escape(arr: pa.Array) -> pa.Array:
    return pc.fill_null(pc.match_substring_regex(arr, _NEEDS_ESCAPE), False)


def _string_token(arr: pa.Array, special: pa.Array) -> pa.Array:
    """Quoted JSON strings; the rare values needing escapes go through json.dumps."""
    token = pc.binary_join_element_wise('"', arr, '"', "")
    if pc.any(special).as_py():
        mask = special.to_numpy(zero_copy_only=False)
        escaped = [json.dumps(v, ensure_ascii=False) for v in arr.filter(special).to_pylist()]
        token = pc.replace_with_mask(token, pa.array(mask), pa.array(escaped, pa.string()))
    return pc.fill_null(token, "null")


def _json_value(arr: pa.Array, trusted: bool) -> tuple[str, pa.Array, str]:
    """A column as (text before, per-row text, text after) of its JSON value.

    Quotes stay in the surrounding literals where possible: fewer, larger joins.
    ``trusted`` string columns are known to hold nothing that needs escaping."""
    if pa.types.is_timestamp(arr.type):
        # A tz-naive cast gives "YYYY-MM-DD HH:MM:SS.mmm" (UTC wall time), 30x faster than
        # strftime or a tz-aware cast.
        text = pc.cast(arr.cast(pa.int64()).cast(pa.timestamp("ms")), pa.string())
        text = pc.replace_substring(text, " ", "T", max_replacements=1)
        if arr.null_count:
            return "", pc.fill_null(pc.binary_join_element_wise('"', text, 'Z"', ""), "null"), ""
        return '"', text, 'Z"'
    if pa.types.is_string(arr.type):
        special = None if trusted else _needs_escape(arr)
        if not arr.null_count and (special is None or not pc.any(special).as_py()):
            return '"', arr, '"'
        return "", _string_token(arr, special if special is not None else _needs_escape(arr)), ""
    if pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type):
        return "", pc.fill_null(pc.cast(arr, pa.string()), "null"), ""
    raise TypeError(f"no JSON formatting for {arr.type}")


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], col.type)


def to_json_lines(table: pa.Table, trusted: Collection[str] = ()) -> pa.Array:
    """One ``{...}\\n`` line per row as a binary array, built without a Python loop.

    Columns named in ``trusted`` skip the scan for characters that need escaping."""
    if not table.num_columns:
        return pa.array([b"{}\n"] * table.num_rows, pa.binary())
    pieces: list[Any] = []
    literal = ""
    for i, name in enumerate(table.column_names):
        before, values, after = _json_value(_column(table, name), name in trusted)
        pieces += [literal + ("{" if i == 0 else ",") + json.dumps(name) + ":" + before, values]
        literal = after
    pieces.append(literal + "}\n")
    return pc.binary_join_element_wise(*pieces, "").cast(pa.binary())


def _line_buffer(lines: pa.Array) -> memoryview:
    """The concatenated bytes of a null-free binary array, zero-copy."""
    if len(lines) == 0:
        return memoryview(b"")
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset: lines.offset + len(lines) + 1]
    return memoryview(lines.buffers()[2])[offsets[0]: offsets[-1]]


# ---------------------------------------------------------------- fault injection

FAULT_CLASSES: dict[str, tuple[str, ...]] = {
    "impressions": ("malformed_json", "missing_field", "wrong_type", "bad_timestamp", "duplicate",
                    "empty_domain", "unknown_domain", "invalid_utf8"),
    "clicks": ("malformed_json", "missing_field", "wrong_type", "bad_timestamp", "duplicate",
               "orphan", "invalid_utf8"),
    "conversions": ("malformed_json", "missing_field", "wrong_type", "bad_timestamp", "duplicate",
                    "orphan", "before_click", "invalid_utf8"),
}
LINE_FAULTS = ("malformed_json", "missing_field", "wrong_type", "bad_timestamp", "invalid_utf8")
PARQUET_SKIPPED_FAULTS = ("malformed_json", "wrong_type", "bad_timestamp", "invalid_utf8")
UNKNOWN_DOMAIN_VALUES = ("Purchase", "sign up", "näh", "type-07", "9lives", "x" * 70)
BAD_TIMESTAMPS = ("2026-13-45T25:61:00Z", "yesterday", "21/11/2026 13:45:12", "2026-02-30T10:00:00Z",
                  "2026-11-21 13:45:12")
MAX_FAULT_RATE = 0.1


@dataclass
class LogContext:
    """What formatting and fault injection need to know about one log, from the config."""

    log: str
    names: DayNames
    kinds: dict[str, str]  # field -> string | timestamp | number
    required: tuple[str, ...]
    fmt: str
    day_start_ms: int
    trusted: frozenset[str] = frozenset()  # string fields that never need JSON escaping
    orphan_counter: int = 0


def field_kinds(cfg: PipelineConfig, log: str) -> dict[str, str]:
    kinds = {name: ("timestamp" if t == "timestamp" else "string" if t == "string" else "number")
             for name, t in cfg.logs[log].required.items()}
    if log == "impressions":
        for f in cfg.features:
            kinds.setdefault(f.name, "string" if f.kind == "categorical" else "number")
    return kinds


def plan_faults(log: str, on_day: np.ndarray, rate: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Disjoint row sets, ceil(rate * n) rows per class, so each class shows up at any size.

    Rows whose event falls on the impression day (``on_day``) are used first and dealt
    round-robin, so every class lands in day D's own partitions, whose build owns it."""
    n_rows = len(on_day)
    k = math.ceil(rate * n_rows) if rate > 0 and n_rows else 0
    order = rng.permutation(n_rows)
    order = order[np.argsort(~on_day[order], kind="stable")]
    classes = [c for c in FAULT_CLASSES[log] if c != "orphan"]
    taken = order[: k * len(classes)]
    plan = {cls: np.sort(taken[i:: len(classes)]) for i, cls in enumerate(classes)}
    if "orphan" in FAULT_CLASSES[log]:
        plan["orphan"] = np.arange(k)
    return plan


def _replace(arr: pa.Array, rows: np.ndarray, values: list[Any]) -> pa.Array:
    mask = np.zeros(len(arr), dtype=bool)
    mask[rows] = True
    order = np.argsort(rows, kind="stable")
    return pc.replace_with_mask(arr, pa.array(mask), pa.array([values[i] for i in order], arr.type))


def _set_column(table: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, arr)


def _domain_faults(table: pa.Table, plan: dict[str, np.ndarray], ctx: LogContext,
                   rng: np.random.Generator) -> pa.Table:
    for cls in ("empty_domain", "unknown_domain"):
        rows = plan.get(cls, np.array([], np.int64))
        if not len(rows):
            continue
        use_type = rng.random(len(rows)) < 0.5
        for field, pick in ((ctx.names.type_field, use_type), (ctx.names.scenario_field, ~use_type)):
            sel = rows[pick]
            if len(sel):
                values = ["" if cls == "empty_domain" else str(rng.choice(UNKNOWN_DOMAIN_VALUES)) for _ in sel]
                table = _set_column(table, field, _replace(_column(table, field), sel, values))
    return table


def _before_click(table: pa.Table, rows: np.ndarray, rng: np.random.Generator) -> pa.Table:
    """Move conversions to just before their click, on the click's own day."""
    all_click_ts = _column(table, "_click_ts").to_numpy()
    rows = rows[all_click_ts[rows] % DAY_MS > 0]  # a click at 00:00:00.000 has no room before it
    if not len(rows):
        return table
    click_ts = all_click_ts[rows]
    since_midnight = click_ts % DAY_MS
    delta = 1 + np.floor(rng.random(len(rows)) * np.minimum(np.maximum(since_midnight - 1, 0), 1_800_000))
    ts = _column(table, "ts").cast(pa.int64()).to_numpy().copy()
    ts[rows] = click_ts - delta.astype(np.int64)
    return _set_column(table, "ts", _timestamps(ts))


def _orphans(table: pa.Table, count: int, ctx: LogContext, rng: np.random.Generator,
             imp_ts: np.ndarray) -> pa.Table:
    """Clicks for unknown impressions / conversions for unknown clicks, dated on the day."""
    if not count or not len(imp_ts):
        return table
    first = ctx.orphan_counter
    ctx.orphan_counter += count
    serial = np.arange(first, first + count)
    ts = np.minimum(imp_ts[rng.integers(len(imp_ts), size=count)] + 1000, ctx.day_start_ms + DAY_MS - 1)
    tag = ctx.names.tag
    if ctx.log == "clicks":
        cols = {ctx.names.click_id: _ids(f"clk-{tag}-orphan-", serial, 6),
                ctx.names.imp_id: _ids(f"imp-{tag}-ghost-", serial, 6)}
    else:
        cols = {ctx.names.conv_id: _ids(f"cnv-{tag}-orphan-", serial, 6),
                ctx.names.click_id: _ids(f"clk-{tag}-ghost-", serial, 6)}
    cols["ts"] = _timestamps(ts)
    if "_click_ts" in table.column_names:
        cols["_click_ts"] = pa.array(ts, pa.int64())
    return pa.concat_tables([table, pa.table(cols).select(table.column_names).cast(table.schema)])


def _null_fields(table: pa.Table, rows: np.ndarray, ctx: LogContext, rng: np.random.Generator) -> pa.Table:
    """Parquet's form of a missing required field: a null."""
    for row in rows:
        name = ctx.required[rng.integers(len(ctx.required))]
        table = _set_column(table, name, _replace(_column(table, name), np.array([row]), [None]))
    return table


def apply_record_faults(table: pa.Table, plan: dict[str, np.ndarray], ctx: LogContext,
                        rng: np.random.Generator, imp_ts: np.ndarray) -> pa.Table:
    """Faults that live in the record itself (both formats): values, extra and moved rows."""
    if ctx.log == "impressions":
        table = _domain_faults(table, plan, ctx, rng)
    if ctx.log == "conversions":
        table = _before_click(table, plan.get("before_click", np.array([], np.int64)), rng)
    if ctx.fmt == "parquet":
        table = _null_fields(table, plan.get("missing_field", np.array([], np.int64)), ctx, rng)
    dup = plan.get("duplicate", np.array([], np.int64))
    if len(dup):
        table = pa.concat_tables([table, table.take(pa.array(dup))])
    return _orphans(table, len(plan.get("orphan", ())), ctx, rng, imp_ts)


def _wrong_value(kind: str, rng: np.random.Generator) -> Any:
    if kind == "number":
        return str(rng.choice(["n/a", "12abc", "thirty"]))
    if kind == "timestamp":
        return 1763732712123
    return [12345, {"v": 1}, True, [1, 2]][rng.integers(4)]


def corrupt_line(cls: str, line: bytes, ctx: LogContext, rng: np.random.Generator) -> bytes:
    """One line-level defect: broken JSON or UTF-8, a dropped field, a wrong type or bad ts."""
    body = line.rstrip(b"\n")
    if cls == "malformed_json":
        cut = int(rng.integers(1, max(2, len(body) - 1)))
        while cut > 1 and (body[cut] & 0xC0) == 0x80:  # never split a UTF-8 sequence
            cut -= 1
        return body[:cut] + b"\n"
    if cls == "invalid_utf8":
        pos = body.find(b'":"')
        pos = pos + 3 if pos >= 0 else 1
        return body[:pos] + b"\xff\xfe" + body[pos:] + b"\n"
    rec = json.loads(body)
    if cls == "missing_field":
        present = [f for f in ctx.required if f in rec]
        del rec[present[rng.integers(len(present))]]
    elif cls == "wrong_type":
        candidates = [f for f in ctx.kinds if f in rec]
        name = candidates[rng.integers(len(candidates))]
        rec[name] = _wrong_value(ctx.kinds[name], rng)
    elif cls == "bad_timestamp":
        ts_field = next(f for f, k in ctx.kinds.items() if k == "timestamp")
        options = [*BAD_TIMESTAMPS, str(rec.get(ts_field, "")).rstrip("Z")]
        rec[ts_field] = options[rng.integers(len(options))]
    else:
        raise ValueError(f"{cls} is not a line fault")
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def apply_line_faults(lines: pa.Array, plan: dict[str, np.ndarray], ctx: LogContext,
                      rng: np.random.Generator) -> pa.Array:
    rows: list[int] = []
    values: list[bytes] = []
    for cls in LINE_FAULTS:
        for row in plan.get(cls, ()):
            rows.append(int(row))
            values.append(corrupt_line(cls, lines[int(row)].as_py(), ctx, rng))
    if not rows:
        return lines
    return _replace(lines, np.array(rows), values)


# ---------------------------------------------------------------- output files


class _JsonlFile:
    def __init__(self, path: Path, compress: bool) -> None:
        self._fh: BinaryIO = gzip.open(path, "wb", compresslevel=GZIP_LEVEL) if compress else open(path, "wb")

    def write(self, table: pa.Table, lines: pa.Array | None) -> None:
        assert lines is not None
        self._fh.write(_line_buffer(lines))

    def close(self) -> None:
        self._fh.close()


class _ParquetFile:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table, lines: pa.Array | None) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._path, table.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class DayOutput:
    """Open files of one impression day, keyed by (log, partition offset), opened lazily."""

    def __init__(self, cfg: PipelineConfig, day: dt.date, fmt: str) -> None:
        self.cfg, self.day, self.fmt = cfg, day, fmt
        self.files: dict[tuple[str, int], _JsonlFile | _ParquetFile] = {}
        self.counts: dict[str, dict[str, int]] = {log: {} for log in LOGS}

    def path(self, log: str, offset: int) -> Path:
        part_day = (self.day + dt.timedelta(days=offset)).isoformat()
        return self.cfg.paths.raw_dir(log, part_day) / f"part-{offset:05d}.{self.fmt}"

    def remove_stale(self, max_offset: int) -> None:
        """Drop files an earlier run wrote for this impression day, in any format."""
        for log in LOGS:
            for offset in range(1 if log == "impressions" else max_offset + 1):
                directory = self.path(log, offset).parent
                for stale in directory.glob(f"part-{offset:05d}.*"):
                    stale.unlink()

    def _file(self, log: str, offset: int) -> _JsonlFile | _ParquetFile:
        key = (log, offset)
        if key not in self.files:
            path = self.path(log, offset)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.files[key] = _ParquetFile(path) if self.fmt == "parquet" else _JsonlFile(path, self.fmt.endswith(".gz"))
        return self.files[key]

    def write(self, log: str, table: pa.Table, lines: pa.Array | None, day_index: np.ndarray) -> None:
        """Route each row to the partition of its own event day."""
        base = (self.day - dt.date(1970, 1, 1)).days
        offsets = day_index - base
        if len(offsets) and offsets.min() < 0:
            raise AssertionError(f"{log}: an event precedes its impression day")
        for offset in np.unique(offsets):
            rows = pa.array(np.flatnonzero(offsets == offset))
            part = table.take(rows)
            self._file(log, int(offset)).write(part, None if lines is None else lines.take(rows))
            part_day = (self.day + dt.timedelta(days=int(offset))).isoformat()
            self.counts[log][part_day] = self.counts[log].get(part_day, 0) + len(rows)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


# ---------------------------------------------------------------- driver


def _day_index(ts: pa.Array, default_ms: int) -> np.ndarray:
    """Event day of each row (days since epoch); rows whose ts was blanked use the default."""
    return pc.fill_null(ts.cast(pa.int64()), default_ms).to_numpy() // DAY_MS


def _max_offset(cfg: PipelineConfig) -> int:
    span = (cfg.windows.click_window_minutes * 60_000 + LATE_CLICK_MAX_MS + REPEAT_CLICK_MAX_MS
            + cfg.windows.attribution_window_hours * 3_600_000 + LATE_CONV_MAX_MS)
    return math.ceil(span / DAY_MS) + 1


def _check_preset(cfg: PipelineConfig, preset: Preset) -> None:
    pattern = re.compile(cfg.domains.value_pattern)
    bad = [v for v in (*preset.types, *preset.scenarios) if not pattern.fullmatch(v)]
    if bad:
        raise ValueError(f"preset {preset.name!r}: values {bad} break domains.value_pattern")


def _escape_free_text(cfg: PipelineConfig, preset: Preset) -> bool:
    """True when every string the generator can write is free of JSON escapes, so the
    per-row scan can be skipped (strings are built from these names and digits)."""
    texts = [*preset.types, *preset.scenarios, *OS_NAMES, *UNKNOWN_DOMAIN_VALUES,
             *(f.name for f in cfg.features), *(n for spec in cfg.logs.values() for n in spec.required)]
    return not any(re.search(_NEEDS_ESCAPE, t) for t in texts)


def _emit(out: DayOutput, log: str, table: pa.Table, ctx: LogContext, rate: float,
          frng: np.random.Generator, imp_ts: np.ndarray) -> None:
    """Inject faults (if any), format and write one log's chunk."""
    on_day = _day_index(_column(table, "ts"), ctx.day_start_ms) == ctx.day_start_ms // DAY_MS
    plan = plan_faults(log, on_day, rate, frng) if rate > 0 else {}
    if plan:
        table = apply_record_faults(table, plan, ctx, frng, imp_ts)
    if "_click_ts" in table.column_names:
        table = table.drop_columns(["_click_ts"])
    lines = None
    if out.fmt != "parquet":
        lines = to_json_lines(table, ctx.trusted)
        if plan:
            lines = apply_line_faults(lines, plan, ctx, frng)
    out.write(log, table, lines, _day_index(_column(table, "ts"), ctx.day_start_ms))


def generate_day(cfg: PipelineConfig, world: World, day: dt.date, n: int, seed: int,
                 fault_rate: float, fmt: str) -> dict[str, dict[str, int]]:
    """All logs of one impression day, chunk by chunk, plus its truth file."""
    names = DayNames.of(cfg, day)
    day_start = (day - dt.date(1970, 1, 1)).days * DAY_MS
    rng = np.random.default_rng(np.random.SeedSequence([seed, day.toordinal(), 1]))
    frng = np.random.default_rng(np.random.SeedSequence([seed, day.toordinal(), 2]))
    click_window_ms = cfg.windows.click_window_minutes * 60_000
    attribution_ms = cfg.windows.attribution_window_hours * 3_600_000
    safe = _escape_free_text(cfg, world.preset)
    ctxs = {}
    for log in LOGS:
        kinds = field_kinds(cfg, log)
        trusted = frozenset(k for k, v in kinds.items() if v == "string") if safe else frozenset()
        ctxs[log] = LogContext(log, names, kinds, tuple(cfg.logs[log].required), fmt, day_start, trusted)

    out = DayOutput(cfg, day, fmt)
    out.remove_stale(_max_offset(cfg))
    truth_path = cfg.paths.truth_file(day.isoformat())
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    truth_schema = pa.schema([("impression_id", pa.string()), ("p_click", pa.float64()),
                              ("p_conversion", pa.float64())])
    n_clicks = n_convs = 0
    try:
        with pq.ParquetWriter(truth_path, truth_schema) as truth:
            for lo in range(0, n, CHUNK_ROWS):
                hi = min(n, lo + CHUNK_ROWS)
                ev = simulate(world, rng, hi - lo, day_start + lo * DAY_MS // n, day_start + hi * DAY_MS // n,
                              click_window_ms, attribution_ms)
                imps = impression_table(cfg, world, ev, names, lo, rng)
                clicks = click_table(ev, names, _column(imps, names.imp_id), n_clicks)
                convs = conversion_table(ev, names, _column(clicks, names.click_id), n_convs)
                n_clicks += clicks.num_rows
                n_convs += convs.num_rows
                truth.write_table(pa.table({"impression_id": _column(imps, names.imp_id),
                                            "p_click": ev.p_click, "p_conversion": ev.p_conversion},
                                           schema=truth_schema))
                for log, table in (("impressions", imps), ("clicks", clicks), ("conversions", convs)):
                    _emit(out, log, table, ctxs[log], fault_rate, frng, ev.ts)
    finally:
        out.close()
    return out.counts


def generate(cfg: PipelineConfig, start_day: str, days: int, *, preset: str | None = None,
             impressions_per_day: int | None = None, seed: int | None = None,
             fault_rate: float = 0.0, fmt: str = "jsonl") -> dict[str, dict[str, int]]:
    """Write raw logs for ``days`` impression days from ``start_day``; returns lines written
    per log and partition day (``{"impressions": {"2026-11-01": n, ...}, ...}``)."""
    preset_name = preset or cfg.generator.preset
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose from {sorted(PRESETS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if not 0.0 <= fault_rate <= MAX_FAULT_RATE:
        raise ValueError(f"fault_rate must lie in [0, {MAX_FAULT_RATE}]")
    if days < 1:
        raise ValueError("days must be >= 1")
    n = int(impressions_per_day if impressions_per_day is not None else cfg.generator.impressions_per_day)
    if n < 1:
        raise ValueError("impressions_per_day must be >= 1")
    run_seed = int(seed if seed is not None else cfg.generator.seed)
    chosen = PRESETS[preset_name]
    _check_preset(cfg, chosen)
    world = build_world(cfg, chosen, run_seed)
    first = dt.date.fromisoformat(start_day)
    totals: dict[str, dict[str, int]] = {log: {} for log in LOGS}
    for i in range(days):
        counts = generate_day(cfg, world, first + dt.timedelta(days=i), n, run_seed, fault_rate, fmt)
        for log, per_day in counts.items():
            for part_day, count in per_day.items():
                totals[log][part_day] = totals[log].get(part_day, 0) + count
    return {log: dict(sorted(per_day.items())) for log, per_day in totals.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.generate_logs",
        description="Write deterministic synthetic raw logs (impressions, clicks, conversions) "
                    "and the true probabilities, per the raw-log contract.",
    )
    parser.add_argument("--start", required=True, help="first impression day, YYYY-MM-DD")
    parser.add_argument("--days", type=int, default=1, help="number of impression days (default 1)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: generator.preset")
    parser.add_argument("--impressions-per-day", type=int, help="default: generator.impressions_per_day")
    parser.add_argument("--seed", type=int, help="default: generator.seed")
    parser.add_argument("--fault-rate", type=float, default=0.0,
                        help="inject each defect class at this rate (default 0: clean logs)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="jsonl")
    return add_config_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, overrides=args.overrides)
    try:
        dt.date.fromisoformat(args.start)
    except ValueError:
        raise SystemExit(f"--start {args.start!r} is not a date (YYYY-MM-DD)") from None
    counts = generate(cfg, args.start, args.days, preset=args.preset,
                      impressions_per_day=args.impressions_per_day, seed=args.seed,
                      fault_rate=args.fault_rate, fmt=args.fmt)
    print(f"raw logs under {cfg.paths.raw_root} (format {args.fmt}), truth under {cfg.paths.truth_root}")
    for log, per_day in counts.items():
        cells = ", ".join(f"{d}: {c}" for d, c in per_day.items())
        print(f"  {log:<12} {sum(per_day.values()):>10} lines  [{cells}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
