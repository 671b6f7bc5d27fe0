"""The synthetic world and its simulation: users, ads and the label model (fixed across
days, so all days share one truth), and one chunk of impressions with their clicks and
conversions drawn from it, as numpy arrays.

Why the label model looks like this: CVR depends on the domain (conversion type x display
scenario) through zero-mean domain x field effects, which per-domain parameters can learn
and a single shared network must average away (see :class:`simulation.presets.Preset`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.config import PipelineConfig
from simulation.columns import SEMANTIC_FIELDS
from simulation.presets import (
    AGE_EDGES,
    AGE_MISSING_RATE,
    N_CATEGORIES,
    N_GENERIC_VALUES,
    OS_NAMES,
    OS_SHARE,
    Preset,
)

DAY_MS = 86_400_000
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
    cvr_type_os: np.ndarray
    cvr_scenario_category: np.ndarray
    cvr_scenario_age: np.ndarray
    cvr_type_bid: np.ndarray  # per-type slope on log(bid), mean zero over types
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
        if f.kind == "categorical" and f.name not in SEMANTIC_FIELDS
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
        cvr_type_category=_centered(rng, preset.type_category_scale, (n_t, N_CATEGORIES)),
        cvr_type_age=_centered(rng, preset.type_age_scale, (n_t, len(AGE_EDGES) + 2)),
        cvr_scenario_os=_centered(rng, preset.scenario_os_scale, (n_s, n_os)),
        **_cross_effects(preset, seed, n_os),
        generic=generic,
    )


def _cross_effects(preset: Preset, seed: int, n_os: int) -> dict[str, np.ndarray]:
    """The extra domain x field effects, from their own stream so that adding them left the
    other presets' worlds (and logs) unchanged."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(preset.name.encode()), 1]))
    n_t, n_s, scale = len(preset.types), len(preset.scenarios), preset.cross_effect_scale
    slope = rng.normal(0.0, scale, n_t)
    return {
        "cvr_type_os": _centered(rng, scale, (n_t, n_os)),
        "cvr_scenario_category": _centered(rng, scale, (n_s, N_CATEGORIES)),
        "cvr_scenario_age": _centered(rng, scale, (n_s, len(AGE_EDGES) + 2)),
        "cvr_type_bid": slope - slope.mean(),
    }


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
                 + world.cvr_type_os[t, os_idx] + world.cvr_scenario_category[s, cat]
                 + world.cvr_scenario_age[s, age_group] + world.cvr_type_bid[t] * np.log(world.ad_bid[ad])
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
