"""Label counts of a day and of its trailing days, read from build manifests.

Drift and row-count bounds come from the trailing days' manifests (``per_domain`` counts)
rather than from re-reading their partitions: a few small JSON files instead of tens of
millions of rows. Everything here is plain data; GX is not imported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from core.config import PipelineConfig
from core.vocab import Vocabulary, load_vocab

Domain = tuple[str, str]  # (conversion type value, display scenario value)
TYPE_AXIS, SCENARIO_AXIS = 0, 1


@dataclass(frozen=True)
class Counts:
    """Samples, clicks and conversions of one slice of data."""

    samples: int = 0
    clicks: int = 0
    conversions: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.samples + other.samples,
            self.clicks + other.clicks,
            self.conversions + other.conversions,
        )

    @property
    def ctr(self) -> float | None:
        return self.clicks / self.samples if self.samples else None

    @property
    def cvr(self) -> float | None:
        """Conversion rate among clicks (the CVR task's label space)."""
        return self.conversions / self.clicks if self.clicks else None


@dataclass(frozen=True)
class DayStats:
    """One day's counts as its build manifest reports them."""

    day: str
    total: Counts
    per_domain: dict[Domain, Counts]
    missing: dict[str, int] | None = None  # samples with a feature's value missing; None: not recorded

    def by_axis(self, axis: int) -> dict[str, Counts]:
        """Counts per conversion type (axis 0) or per display scenario (axis 1)."""
        out: dict[str, Counts] = {}
        for domain, counts in self.per_domain.items():
            out[domain[axis]] = out.get(domain[axis], Counts()) + counts
        return out


@dataclass(frozen=True)
class TrailingStats:
    """The usable trailing days (oldest first) and why others were left out."""

    days: tuple[DayStats, ...] = ()
    skipped: tuple[str, ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.days)

    @property
    def mean_rows(self) -> float:
        return sum(d.total.samples for d in self.days) / len(self.days)

    @property
    def total(self) -> Counts:
        return sum((d.total for d in self.days), Counts())

    def by_axis(self, axis: int) -> dict[str, Counts]:
        """Counts pooled over the trailing days, per type or per scenario value."""
        out: dict[str, Counts] = {}
        for day in self.days:
            for value, counts in day.by_axis(axis).items():
                out[value] = out.get(value, Counts()) + counts
        return out

    def missing_share(self, column: str) -> float | None:
        """A feature column's missing share pooled over the trailing days that recorded it."""
        days = [d for d in self.days if d.missing is not None and column in d.missing]
        samples = sum(d.total.samples for d in days)
        return sum(d.missing[column] for d in days) / samples if samples else None  # type: ignore[index]

    def domains(self) -> set[Domain]:
        """Domains with samples on at least one trailing day."""
        return {dom for d in self.days for dom, c in d.per_domain.items() if c.samples > 0}


def read_manifest(cfg: PipelineConfig, day: str) -> dict[str, Any] | None:
    """The day's build manifest, or None when the build never wrote one."""
    path = cfg.paths.manifest_path(day)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def day_stats(cfg: PipelineConfig, manifest: Mapping[str, Any]) -> DayStats:
    """Counts from a manifest's ``outputs`` and ``per_domain`` sections."""
    type_field, scenario_field = cfg.domains.type_field, cfg.domains.scenario_field
    per_domain: dict[Domain, Counts] = {}
    for row in manifest.get("per_domain") or []:
        domain = (str(row[type_field]), str(row[scenario_field]))
        counts = Counts(int(row["samples"]), int(row["clicks"]), int(row["conversions"]))
        per_domain[domain] = per_domain.get(domain, Counts()) + counts
    outputs = manifest.get("outputs") or {}
    total = Counts(
        int(outputs.get("samples", sum(c.samples for c in per_domain.values()))),
        int(outputs.get("clicks", sum(c.clicks for c in per_domain.values()))),
        int(outputs.get("conversions", sum(c.conversions for c in per_domain.values()))),
    )
    missing = manifest.get("missing")
    return DayStats(day=str(manifest.get("day", "")), total=total, per_domain=per_domain,
                    missing={str(k): int(v) for k, v in missing.items()} if isinstance(missing, Mapping) else None)


def trailing_days(day: str, n: int) -> list[str]:
    """The n calendar days before ``day``, oldest first."""
    d = date.fromisoformat(day)
    return [(d - timedelta(days=k)).isoformat() for k in range(n, 0, -1)]


def load_trailing_stats(cfg: PipelineConfig, day: str) -> TrailingStats:
    """Stats of the trailing days that have a manifest and did not fail validation.

    A day whose stored validation failed is left out so a bad day cannot become the
    baseline that makes the next bad day look normal.
    """
    used: list[DayStats] = []
    skipped: list[str] = []
    for prior in trailing_days(day, cfg.validation.trailing_days):
        manifest = read_manifest(cfg, prior)
        if manifest is None:
            skipped.append(f"{prior}: no manifest")
        elif _stored_validation_failed(cfg.paths.validation_dir(prior) / "results.json"):
            skipped.append(f"{prior}: failed validation")
        else:
            stats = day_stats(cfg, manifest)
            used.append(DayStats(day=prior, total=stats.total, per_domain=stats.per_domain,
                                 missing=stats.missing))
    return TrailingStats(days=tuple(used), skipped=tuple(skipped))


def _stored_validation_failed(results_path: Path) -> bool:
    if not results_path.is_file():
        return False
    try:
        return json.loads(results_path.read_text()).get("success") is False
    except (json.JSONDecodeError, AttributeError):
        return False


def load_domain_vocab(cfg: PipelineConfig) -> dict[str, Vocabulary]:
    """The persisted vocabularies, keyed by domain field name (type field, scenario field)."""
    return {
        name: load_vocab(cfg.paths.vocab_dir, name)
        for name in (cfg.domains.type_field, cfg.domains.scenario_field)
    }
