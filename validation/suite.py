"""The samples expectation suite, generated from the pipeline config.

Every column name, id range and threshold comes from ``cfg`` (conf/pipeline.yaml) or from
the samples contract in :mod:`core.contracts` (docs/contracts.md), so a new feature field or
domain value is covered without code changes. Each expectation carries a stable check id in
``meta["check"]``; :func:`build_suite` returns a map check id -> "error" | "warning".
Errors stop training; warnings are logged. GX's own ``severity`` is set to match
(critical / warning) so it shows in stored results.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import great_expectations as gx
import pandas as pd
from great_expectations.expectations.row_conditions import Column

from core.config import PipelineConfig
from core.contracts import CLICK, CONVERSION, SCENARIO_ID, TS, TYPE_ID, feature_columns, sample_id_column
from core.vocab import Vocabulary
from validation.baseline import (
    SCENARIO_AXIS,
    TYPE_AXIS,
    Counts,
    DayStats,
    TrailingStats,
    day_stats,
)

ERROR, WARNING = "error", "warning"
_GX_SEVERITY = {ERROR: "critical", WARNING: "warning"}

SAMPLES_SUITE = "samples"
MANIFEST_SUITE = "manifest"

# How each contract type looks to each GX execution engine.
ENGINE_TYPES: dict[str, dict[str, str]] = {
    "pandas": {"string": "str", "timestamp": "Timestamp", "int32": "int32"},
    "spark": {"string": "StringType", "timestamp": "TimestampType", "int32": "IntegerType"},
}

Severities = dict[str, str]


def samples_contract(cfg: PipelineConfig) -> dict[str, str]:
    """Column -> contract type of the samples dataset, in contract order."""
    contract = {
        sample_id_column(cfg): "string",
        TS: "timestamp",
        cfg.domains.type_field: "string",
        cfg.domains.scenario_field: "string",
        TYPE_ID: "int32",
        SCENARIO_ID: "int32",
    }
    contract.update({column: "int32" for column in feature_columns(cfg)})
    contract.update({CLICK: "int32", CONVERSION: "int32"})
    return contract


def drift_error_factor(cfg: PipelineConfig) -> float:
    """Ratio vs trailing at which a rate's drift becomes an error (at least the warn band)."""
    return max(cfg.validation.drift_error_factor, 1.0 + cfg.validation.drift_tolerance)


class _Builder:
    """Accumulates expectations with their check ids, severities and notes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.expectations: list[Any] = []
        self.notes: list[str] = []
        self.severities: Severities = {}

    def add(self, check: str, severity: str, expectation: type, **kwargs: Any) -> None:
        if check in self.severities:
            raise ValueError(f"duplicate check id {check!r}")
        meta = {"check": check, "severity": severity}
        self.expectations.append(expectation(**kwargs, meta=meta, severity=_GX_SEVERITY[severity]))
        self.severities[check] = severity

    def note(self, text: str) -> None:
        self.notes.append(text)

    def build(self) -> tuple[gx.ExpectationSuite, Severities]:
        """The suite, built detached from any GX context (the runner registers it)."""
        suite = gx.ExpectationSuite(name=self.name, expectations=self.expectations,
                                    notes=self.notes)
        return suite, self.severities


def build_suite(
    cfg: PipelineConfig,
    day: str,
    *,
    trailing_stats: TrailingStats,
    manifest: Mapping[str, Any] | None,
    vocab: Mapping[str, Vocabulary],
    engine: str = "pandas",
) -> tuple[gx.ExpectationSuite, Severities]:
    """Expectations for one day's samples partition, with a check id -> severity map.

    ``vocab`` maps the domain field names (cfg.domains.type_field / scenario_field) to
    their persisted vocabularies. ``manifest`` is the day's build manifest (None when
    missing: the manifest suite reports that; consistency checks are skipped here).
    """
    b = _Builder(SAMPLES_SUITE)
    b.note(f"samples of dt={day}")
    _schema_checks(b, cfg, engine)
    _row_checks(b, cfg)
    _missing_checks(b, cfg, trailing_stats)
    _vocab_checks(b, cfg, vocab)
    today = day_stats(cfg, manifest) if manifest is not None else None
    _manifest_consistency_checks(b, today)
    if not trailing_stats:
        b.note(
            f"no usable trailing day in the {cfg.validation.trailing_days} days before "
            f"{day}: row-count, drift and domain-set checks skipped"
        )
    else:
        _row_count_checks(b, cfg, trailing_stats)
        _rate_drift_checks(b, cfg, trailing_stats, today)
        _domain_set_checks(b, cfg, trailing_stats)
    for reason in trailing_stats.skipped:
        b.note(f"trailing day left out: {reason}")
    return b.build()


def _schema_checks(b: _Builder, cfg: PipelineConfig, engine: str) -> None:
    """Every contract column exists with its contract type."""
    types = ENGINE_TYPES[engine]
    for column, kind in samples_contract(cfg).items():
        b.add(f"exists:{column}", ERROR, gx.expectations.ExpectColumnToExist, column=column)
        b.add(
            f"type:{column}", ERROR, gx.expectations.ExpectColumnValuesToBeOfType,
            column=column, type_=types[kind],
        )


def _row_checks(b: _Builder, cfg: PipelineConfig) -> None:
    """Non-null columns, unique ids, binary labels, conversion => click, feature id ranges."""
    id_field = sample_id_column(cfg)
    for column in samples_contract(cfg):
        b.add(
            f"not_null:{column}", ERROR, gx.expectations.ExpectColumnValuesToNotBeNull,
            column=column,
        )
    b.add(f"unique:{id_field}", ERROR, gx.expectations.ExpectColumnValuesToBeUnique,
          column=id_field)
    for label in (CLICK, CONVERSION):
        b.add(f"binary:{label}", ERROR, gx.expectations.ExpectColumnValuesToBeInSet,
              column=label, value_set=[0, 1])
    b.add(
        "conversion_implies_click", ERROR,
        gx.expectations.ExpectColumnPairValuesAToBeGreaterThanB,
        column_A=CLICK, column_B=CONVERSION, or_equal=True,
    )
    # Ranges as column min / max: GX's pandas values-between maps a Python function over
    # every int32 value (seconds per million rows); min / max are vectorized everywhere
    # and their observed value is the offending extreme.
    for feature in cfg.features:
        b.add(f"min:{feature.column}", ERROR, gx.expectations.ExpectColumnMinToBeBetween,
              column=feature.column, min_value=0)
        b.add(f"max:{feature.column}", ERROR, gx.expectations.ExpectColumnMaxToBeBetween,
              column=feature.column, max_value=feature.cardinality - 1)


def _missing_checks(b: _Builder, cfg: PipelineConfig, trailing: TrailingStats) -> None:
    """Each feature's missing share (id 0: its field was null, empty or absent; hashing gives
    a present value an id >= 1): at most ``validation.max_missing_share``, and at most
    ``validation.missing_share_increase`` above its share on the trailing days. Range checks
    cannot see a feature that vanished, since id 0 is in range."""
    ceiling = cfg.validation.max_missing_share
    increase = cfg.validation.missing_share_increase
    for feature in cfg.features:
        column = feature.column
        if ceiling < 1:
            b.add(f"missing:{column}", ERROR, gx.expectations.ExpectColumnValuesToNotBeInSet,
                  column=column, value_set=[0], mostly=_r(1 - ceiling))
        base = trailing.missing_share(column) if trailing else None
        if base is None:
            continue
        limit = base + increase
        if limit < min(ceiling, 1.0):
            b.add(f"missing_drift:{column}", ERROR, gx.expectations.ExpectColumnValuesToNotBeInSet,
                  column=column, value_set=[0], mostly=_r(1 - limit))
            b.note(f"{column}: missing share {base:.4f} on trailing days, at most {limit:.4f} today")


def _vocab_checks(b: _Builder, cfg: PipelineConfig, vocab: Mapping[str, Vocabulary]) -> None:
    """Domain ids and raw values are known to the vocabulary and fit model capacity."""
    axes = (
        (cfg.domains.type_field, TYPE_ID, cfg.domains.max_types),
        (cfg.domains.scenario_field, SCENARIO_ID, cfg.domains.max_scenarios),
    )
    for field_name, id_column, capacity in axes:
        voc = vocab[field_name]
        b.add(
            f"vocab:{id_column}", ERROR, gx.expectations.ExpectColumnValuesToBeInSet,
            column=id_column, value_set=list(range(len(voc))),
        )
        b.add(
            f"vocab:{field_name}", ERROR, gx.expectations.ExpectColumnValuesToBeInSet,
            column=field_name, value_set=voc.values(),
        )
        b.add(
            f"capacity:{id_column}", ERROR, gx.expectations.ExpectColumnMaxToBeBetween,
            column=id_column, max_value=capacity - 1,
        )


def _manifest_consistency_checks(b: _Builder, today: DayStats | None) -> None:
    """The partition holds exactly the rows and labels its manifest reports."""
    if today is None:
        b.note("no manifest: partition-vs-manifest consistency checks skipped")
        return
    b.add("manifest_rows", ERROR, gx.expectations.ExpectTableRowCountToEqual,
          value=today.total.samples)
    for label, count in ((CLICK, today.total.clicks), (CONVERSION, today.total.conversions)):
        b.add(f"manifest_sum:{label}", ERROR, gx.expectations.ExpectColumnSumToBeBetween,
              column=label, min_value=count, max_value=count)


def _row_count_checks(b: _Builder, cfg: PipelineConfig, trailing: TrailingStats) -> None:
    """Row count within +/- row_count_tolerance of the trailing mean."""
    tol = cfg.validation.row_count_tolerance
    mean = trailing.mean_rows
    b.add(
        "row_count:trailing", ERROR, gx.expectations.ExpectTableRowCountToBeBetween,
        min_value=max(0, math.ceil(mean * (1 - tol))), max_value=math.floor(mean * (1 + tol)),
    )
    b.note(f"trailing mean rows {mean:.1f} over {len(trailing.days)} day(s)")


def _bounds(base: float, tol: float) -> tuple[float, float]:
    return max(0.0, base * (1 - tol)), base * (1 + tol)


def _add_rate_pair(
    b: _Builder, cfg: PipelineConfig, name: str, column: str, base: float, row_condition: Any
) -> None:
    """A warning band (drift_tolerance) and a wider error band (drift_error_factor)."""
    warn_lo, warn_hi = _bounds(base, cfg.validation.drift_tolerance)
    factor = drift_error_factor(cfg)
    extra = {} if row_condition is None else {"row_condition": row_condition}
    b.add(
        f"drift:{name}", WARNING, gx.expectations.ExpectColumnMeanToBeBetween,
        column=column, min_value=_r(warn_lo), max_value=_r(warn_hi), **extra,
    )
    b.add(
        f"jump:{name}", ERROR, gx.expectations.ExpectColumnMeanToBeBetween,
        column=column, min_value=_r(min(base / factor, warn_lo)),
        max_value=_r(max(base * factor, warn_hi)), **extra,
    )


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def _rate_drift_checks(
    b: _Builder, cfg: PipelineConfig, trailing: TrailingStats, today: DayStats | None
) -> None:
    """Overall CTR / CVR and per-type / per-scenario CVR vs the trailing days."""
    clicked = Column(CLICK) == 1
    total = trailing.total
    if total.ctr is not None:
        _add_rate_pair(b, cfg, "ctr", CLICK, total.ctr, None)
    if total.cvr:
        _add_rate_pair(b, cfg, "cvr", CONVERSION, total.cvr, clicked)
    axes = ((TYPE_AXIS, cfg.domains.type_field), (SCENARIO_AXIS, cfg.domains.scenario_field))
    for axis, field_name in axes:
        today_counts = today.by_axis(axis) if today is not None and today.per_domain else None
        for value, counts in sorted(trailing.by_axis(axis).items()):
            if not _drift_eligible(b, cfg, f"{field_name}={value}", counts, trailing,
                                   today_counts, value):
                continue
            condition = clicked & (Column(field_name) == value)
            _add_rate_pair(b, cfg, f"cvr[{field_name}={value}]", CONVERSION, counts.cvr,
                           condition)


def _drift_eligible(
    b: _Builder,
    cfg: PipelineConfig,
    label: str,
    counts: Counts,
    trailing: TrailingStats,
    today_counts: Mapping[str, Counts] | None,
    value: str,
) -> bool:
    """Enough clicks on the trailing days (daily mean) and today to compare CVRs."""
    min_clicks = cfg.validation.drift_min_clicks
    if counts.clicks / len(trailing.days) < min_clicks:
        return False
    if today_counts is not None and today_counts.get(value, Counts()).clicks < min_clicks:
        b.note(f"CVR drift for {label} skipped: fewer than {min_clicks} clicks today")
        return False
    if not counts.cvr:
        b.note(f"CVR drift for {label} skipped: no trailing conversions")
        return False
    return True


def _domain_set_checks(b: _Builder, cfg: PipelineConfig, trailing: TrailingStats) -> None:
    """Report domains (types, scenarios, type x scenario pairs) that vanish or appear."""
    type_field, scenario_field = cfg.domains.type_field, cfg.domains.scenario_field
    domains = trailing.domains()
    for field_name, axis in ((type_field, TYPE_AXIS), (scenario_field, SCENARIO_AXIS)):
        b.add(
            f"domains:{field_name}", WARNING,
            gx.expectations.ExpectColumnDistinctValuesToEqualSet,
            column=field_name, value_set=sorted({d[axis] for d in domains}),
        )
    for type_value in sorted({d[TYPE_AXIS] for d in domains}):
        b.add(
            f"domains:{scenario_field}[{type_field}={type_value}]", WARNING,
            gx.expectations.ExpectColumnDistinctValuesToEqualSet,
            column=scenario_field,
            value_set=sorted(s for t, s in domains if t == type_value),
            row_condition=Column(type_field) == type_value,
        )


MANIFEST_PATH, MANIFEST_PRESENT, QUARANTINE_SHARE = (
    "manifest_path", "manifest_present", "quarantine_share",
)


def vocab_capacity_column(field_name: str) -> str:
    return f"vocab_over_capacity:{field_name}"


def vocab_conflict_column(field_name: str) -> str:
    return f"vocab_conflict:{field_name}"


@dataclass(frozen=True)
class VocabStatus:
    """The day's staged vocabulary of one domain field against the committed one."""

    size: int
    capacity: int
    new_values: tuple[str, ...] = ()
    conflict: str | None = None

    def over_capacity(self) -> str | None:
        """A sentence naming the day's new values when the vocabulary outgrows the model."""
        if self.size <= self.capacity:
            return None
        return (f"{self.size} values, capacity {self.capacity}; new on this day "
                f"({len(self.new_values)}): {', '.join(self.new_values)}")


def manifest_frame(cfg: PipelineConfig, day: str, manifest: Mapping[str, Any] | None,
                   vocab_status: Mapping[str, VocabStatus] | None = None) -> pd.DataFrame:
    """One-row batch of the build facts the manifest suite checks."""
    share = None if manifest is None else manifest.get("quarantine_share")
    frame = {
        MANIFEST_PATH: [str(cfg.paths.manifest_path(day))],
        MANIFEST_PRESENT: [manifest is not None],
        QUARANTINE_SHARE: pd.array([share], dtype="Float64"),
    }
    for name, status in (vocab_status or {}).items():
        frame[vocab_capacity_column(name)] = pd.array([status.over_capacity()], dtype="string")
        frame[vocab_conflict_column(name)] = pd.array([status.conflict], dtype="string")
    return pd.DataFrame(frame)


def build_manifest_suite(cfg: PipelineConfig, day: str, vocab_fields: Sequence[str] = ()
                         ) -> tuple[gx.ExpectationSuite, Severities]:
    """Build-level checks on the day's manifest: it exists, and little was quarantined; and on
    the vocabulary the build staged for the day (``vocab_fields``): it fits the model's
    capacity (else the error names the day's new values) and extends the committed one.

    A GX suite validates one batch; these facts live in the manifest, not in the samples,
    so they form a sibling suite validated against :func:`manifest_frame`.
    """
    b = _Builder(MANIFEST_SUITE)
    b.note(f"build manifest of dt={day}: {cfg.paths.manifest_path(day)}")
    b.add("manifest:present", ERROR, gx.expectations.ExpectColumnValuesToBeInSet,
          column=MANIFEST_PRESENT, value_set=[True])
    b.add(f"not_null:{QUARANTINE_SHARE}", ERROR, gx.expectations.ExpectColumnValuesToNotBeNull,
          column=QUARANTINE_SHARE)
    b.add(
        f"max:{QUARANTINE_SHARE}", ERROR, gx.expectations.ExpectColumnValuesToBeBetween,
        column=QUARANTINE_SHARE, min_value=0.0, max_value=cfg.validation.max_quarantine_share,
    )
    for name in vocab_fields:
        b.add(f"capacity:{name}", ERROR, gx.expectations.ExpectColumnValuesToBeNull,
              column=vocab_capacity_column(name))
        b.add(f"vocab_base:{name}", ERROR, gx.expectations.ExpectColumnValuesToBeNull,
              column=vocab_conflict_column(name))
    return b.build()
