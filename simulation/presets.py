"""The generator's presets: domain names and base rates of each synthetic world, and the
population constants every preset shares (OS names and shares, age groups, categories).

Kept apart from the world and the columns so both can read these without importing each
other. Values obey ``domains.value_pattern`` (checked by the driver before any write).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AGE_MISSING_RATE = 0.03
OS_NAMES = ("android", "ios", "windows", "macos", "linux", "harmonyos")
OS_SHARE = (0.50, 0.30, 0.08, 0.06, 0.03, 0.03)
AGE_EDGES = (25.0, 35.0, 45.0, 55.0)  # the world's age groups (5) plus one for "unknown"
N_CATEGORIES = 60
N_GENERIC_VALUES = 50


@dataclass(frozen=True)
class Preset:
    """Domain names and base rates of one synthetic world (names obey the value pattern)."""

    name: str
    types: tuple[str, ...]
    type_cvr: tuple[float, ...]
    scenarios: tuple[str, ...]
    scenario_cvr: tuple[float, ...]
    scenario_ctr: tuple[float, ...]
    # Scales (logit units) of the domain-specific CVR effects. Each is zero-mean per domain,
    # so a domain's base rate stays its base rate; the effects live on low-cardinality
    # (device_os, age group) and mid-cardinality (ad_category) fields, where per-domain
    # parameters can learn them from a few days and a shared model must average them away.
    type_category_scale: float = 0.7
    type_age_scale: float = 0.6
    scenario_os_scale: float = 0.5
    # type x os, scenario x category, scenario x age and a per-type bid slope; 0 keeps the
    # paper-shaped presets' logs exactly as they were.
    cross_effect_scale: float = 0.0


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
    # Built to rank models: fewer, busier domains (8 x 6) with high enough rates that most
    # domains get 100+ holdout conversions at a few hundred thousand impressions a day, and
    # strong domain-specific effects on low/mid-cardinality fields beside the shared and
    # id-level (user, ad, advertiser) effects every preset has.
    "multidomain": Preset(
        name="multidomain",
        types=("purchase", "signup", "add_to_cart", "lead", "app_install", "subscribe",
               "form", "download"),
        type_cvr=_shuffled(_geom(0.05, 0.25, 8), 5),
        scenarios=("banner", "news_feed", "video", "search_result", "native_card", "splash"),
        scenario_cvr=_shuffled(_geom(0.08, 0.16, 6), 6),
        scenario_ctr=_shuffled(_geom(0.04, 0.10, 6), 7),
        type_category_scale=1.0,
        type_age_scale=0.8,
        scenario_os_scale=0.7,
        cross_effect_scale=0.6,
    ),
}
