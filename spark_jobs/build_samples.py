"""Spark build job: one impression day's raw logs -> hashed, labelled, mixed-domain samples.

Run ``spark-submit --master <cfg.spark.master> spark_jobs/build_samples.py --day D`` from the
repository root, or import :func:`build_day`. Why it is shaped this way:

* Every raw line is accounted for. The manifest counts each record read as used,
  quarantined (breaks the contract; written to ``quarantine/dt=D`` with a reason) or
  explained (valid but not part of day D's labels, with the reason), and the job fails
  rather than write a manifest where ``records != used + quarantined + explained``.
* A record is quarantined by exactly one day's build: defects of the record itself and
  orphans by the build of the partition the record sits in; join defects (a conversion
  before its click, a click before its impression) by the build of the impression's day.
  Records of neighbouring partitions read only for the joins are ``explained`` here.
* JSON lines are read as text and parsed with explicit schemas (a typed fast path; a
  variant-typed exact check where a value's JSON type is in doubt), so each defect gets its
  own reason: broken UTF-8, broken JSON, missing required field, wrong JSON type, bad
  timestamp, unknown domain value. Parquet records go through the same parser as JSON.
* Hashing uses Spark expressions equal to :mod:`core.hashing` (tests/test_hashing_parity.py).
* Outputs are staged and swapped in whole, so a rerun of a day replaces it exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:  # spark-submit runs this file without installing the package
    sys.path.insert(0, _REPO_ROOT)

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import reduce  # noqa: E402
from typing import Any  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from pyspark import StorageLevel  # noqa: E402
from pyspark.sql import Column, DataFrame, SparkSession, Window  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402
from pyspark.sql import types as T  # noqa: E402

from core.config import ConfigError, FeatureField, PipelineConfig, add_config_arguments, load_config  # noqa: E402
from core.raw_inputs import MissingRawLogsError, data_files, require_impressions  # noqa: E402
from core.vocab import Vocabulary, load_vocab, save_vocab  # noqa: E402

LOGS = ("impressions", "clicks", "conversions")

# Reason codes, quarantined: the record breaks the raw-log contract.
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_required_field"
WRONG_TYPE = "wrong_type"
BAD_TIMESTAMP = "bad_timestamp"
UNKNOWN_DOMAIN = "unknown_domain_value"
ORPHAN_CLICK = "orphan_click"
ORPHAN_CONVERSION = "orphan_conversion"
CLICK_BEFORE_IMPRESSION = "click_before_impression"
CONVERSION_BEFORE_CLICK = "conversion_before_click"
QUARANTINE_REASONS = (INVALID_UTF8, MALFORMED_JSON, MISSING_FIELD, WRONG_TYPE, BAD_TIMESTAMP, UNKNOWN_DOMAIN,
                      ORPHAN_CLICK, ORPHAN_CONVERSION, CLICK_BEFORE_IMPRESSION, CONVERSION_BEFORE_CLICK)

# Reason codes, explained: a valid record that doesn't count for day D, and why.
DUPLICATE = "duplicate"  # same id seen before: one copy is kept
OTHER_IMPRESSION_DAY = "other_impression_day"  # belongs to an impression of another day
OTHER_PARTITION = "other_partition"  # a defect or orphan of a neighbouring partition: its own build quarantines it
IMPRESSION_QUARANTINED = "impression_quarantined"  # click of a day-D impression that was quarantined
OUTSIDE_CLICK_WINDOW = "outside_click_window"
REPEAT_CLICK = "repeat_click"  # a later click of an impression already clicked
CLICK_NOT_COUNTED = "click_not_counted"  # conversion of a day-D click that doesn't count
CLICK_INVALID = "click_invalid"  # conversion whose click was quarantined or unattributable
OUTSIDE_ATTRIBUTION_WINDOW = "outside_attribution_window"
REPEAT_CONVERSION = "repeat_conversion"  # a further conversion of an already converted click
EXPLAINED_REASONS = (DUPLICATE, OTHER_IMPRESSION_DAY, OTHER_PARTITION, IMPRESSION_QUARANTINED, OUTSIDE_CLICK_WINDOW,
                     REPEAT_CLICK, CLICK_NOT_COUNTED, CLICK_INVALID, OUTSIDE_ATTRIBUTION_WINDOW, REPEAT_CONVERSION)

USED, QUARANTINED, EXPLAINED = "used", "quarantined", "explained"
CORRUPT = "_corrupt_record"
ISO_TS = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$"
NUMERIC_VARIANT = r"^(TINYINT|SMALLINT|INT|BIGINT|FLOAT|DOUBLE|DECIMAL\(.*\))$"
LINE_BREAKS = "[\\n\\r\\u0085\\u2028\\u2029]"
KIND_OF_TYPE = {"string": "string", "timestamp": "timestamp", "double": "number", "float": "number",
                "number": "number", "int": "number", "integer": "number", "long": "number", "bigint": "number"}


class MissingInputError(SystemExit):
    """Day D has no impressions to build: a clear message instead of a Spark stack trace."""


class AccountingError(RuntimeError):
    """records != used + quarantined + explained for a log: a bug, never written out."""


# ---------------------------------------------------------------- feature hashing


def categorical_id_expr(field: FeatureField, value: Column) -> Column:
    """``1 + pmod(xxhash64("<name>=" + v), buckets - 1)``; null or "" -> 0 (core.hashing)."""
    hashed = F.pmod(F.xxhash64(F.concat(F.lit(f"{field.name}="), value)), F.lit(field.buckets - 1)) + 1
    return F.when(value.isNull() | (value == ""), F.lit(0)).otherwise(hashed).cast("int")


def numeric_id_expr(field: FeatureField, value: Column) -> Column:
    """``1 + #{b : value >= b}``; null or NaN -> 0 (Spark orders NaN above +inf, so test it first)."""
    bucket = reduce(lambda acc, b: acc + F.when(value >= F.lit(float(b)), 1).otherwise(0), field.boundaries, F.lit(1))
    return F.when(value.isNull() | F.isnan(value), F.lit(0)).otherwise(bucket).cast("int")


def feature_id_expr(field: FeatureField, value: Column) -> Column:
    if field.kind == "categorical":
        return categorical_id_expr(field, value)
    return numeric_id_expr(field, value.cast("double"))


# ---------------------------------------------------------------- what to read


@dataclass(frozen=True)
class LogFields:
    """A log's field names and JSON kinds (string | timestamp | number), from the config."""

    log: str
    kinds: dict[str, str]
    required: tuple[str, ...]
    id_field: str
    ts_field: str
    ref_field: str | None  # foreign key: clicks -> impression id, conversions -> click id
    domain_fields: tuple[str, ...]


def log_fields(cfg: PipelineConfig, log: str) -> LogFields:
    spec = cfg.logs[log]
    kinds: dict[str, str] = {}
    for name, type_name in spec.required.items():
        if type_name not in KIND_OF_TYPE:
            raise ConfigError(f"logs.{log}.required.{name}: unsupported type {type_name!r}")
        kinds[name] = KIND_OF_TYPE[type_name]
    domain: tuple[str, ...] = ()
    if log == "impressions":
        domain = (cfg.domains.type_field, cfg.domains.scenario_field)
        for name in domain:
            kinds.setdefault(name, "string")
        for f in cfg.features:
            kinds.setdefault(f.name, "string" if f.kind == "categorical" else "number")
    ts_fields = [n for n, k in kinds.items() if k == "timestamp"]
    if len(ts_fields) != 1:
        raise ConfigError(f"logs.{log}: exactly one required timestamp field is needed, got {ts_fields}")
    ref = {"clicks": cfg.logs["impressions"].id_field, "conversions": cfg.logs["clicks"].id_field}.get(log)
    required = tuple(dict.fromkeys([*spec.required, *domain]))
    for name in (spec.id_field, *([ref] if ref else [])):
        if name not in kinds or kinds[name] != "string":
            raise ConfigError(f"logs.{log}: {name!r} must be a required string field")
    return LogFields(log, kinds, required, spec.id_field, ts_fields[0], ref, domain)


def shift(day: str, days: int) -> str:
    return (dt.date.fromisoformat(day) + dt.timedelta(days=days)).isoformat()


def partition_spans(cfg: PipelineConfig) -> tuple[int, int]:
    """Days after D that can hold a counted click / a counted conversion of a day-D impression."""
    click_days = math.ceil(cfg.windows.click_window_minutes / 1440)
    conversion_days = math.ceil((cfg.windows.click_window_minutes + cfg.windows.attribution_window_hours * 60) / 1440)
    return click_days, conversion_days


def _file_path() -> Column:
    return F.col("_metadata.file_path").alias("source_file")


def _spark_type(arrow_type: pa.DataType) -> T.DataType | None:
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return T.StringType()
    if pa.types.is_floating(arrow_type) and arrow_type.bit_width in (32, 64):
        return T.FloatType() if arrow_type.bit_width == 32 else T.DoubleType()
    if pa.types.is_signed_integer(arrow_type):
        return {8: T.ByteType(), 16: T.ShortType(), 32: T.IntegerType(), 64: T.LongType()}[arrow_type.bit_width]
    if pa.types.is_boolean(arrow_type):
        return T.BooleanType()
    if pa.types.is_timestamp(arrow_type):
        return T.TimestampType() if arrow_type.tz else T.TimestampNTZType()
    return None


def read_parquet(spark: SparkSession, path: str) -> DataFrame:
    """One Parquet file, its schema taken from the footer on the driver (Spark would run a
    job per file to infer it); unusual column types fall back to Spark's inference."""
    fields = []
    for f in pq.read_schema(path):
        spark_type = _spark_type(f.type)
        if spark_type is None:
            return spark.read.parquet(path)
        fields.append(T.StructField(f.name, spark_type))
    return spark.read.schema(T.StructType(fields)).parquet(path)


def read_raw(spark: SparkSession, cfg: PipelineConfig, log: str, days: Sequence[str]) -> tuple[DataFrame, list[str]]:
    """Raw records as text (``value``, ``source_file``, ``part_day``) and the partitions found.

    JSON lines are read as text (gzip by extension); a Parquet record becomes the JSON of
    its row, so both go through one parser. Blank lines are not records."""
    frames: list[DataFrame] = []
    found: list[str] = []
    for day in days:
        text, parquet = data_files(cfg.paths.raw_dir(log, day))
        if text or parquet:
            found.append(day)
        if text:
            frames.append(spark.read.text(text).select("value", _file_path(), F.lit(day).alias("part_day")))
        for path in parquet:
            df = read_parquet(spark, path)
            row_json = F.to_json(F.struct(*[F.col(f"`{c}`") for c in df.columns]))
            frames.append(df.select(row_json.alias("value"), _file_path(), F.lit(day).alias("part_day")))
    if not frames:
        schema = "value string, source_file string, part_day string"
        return spark.createDataFrame([], schema), found
    raw = reduce(DataFrame.unionByName, frames)
    return raw.filter(F.trim(F.col("value")) != ""), found


def read_ids(spark: SparkSession, cfg: PipelineConfig, log: str, days: Sequence[str], id_field: str,
             wanted: DataFrame | None = None) -> DataFrame:
    """Only the ids of a log's partitions (for telling a neighbour day's record from an orphan),
    optionally only those in ``wanted`` (a small one-column ``ref`` frame, broadcast)."""
    frames: list[DataFrame] = []
    for day in days:
        text, parquet = data_files(cfg.paths.raw_dir(log, day))
        if text:
            frames.append(spark.read.text(text).select(F.get_json_object("value", f"$['{id_field}']").alias("id")))
        for path in parquet:
            df = read_parquet(spark, path)
            if id_field in df.columns:
                frames.append(df.select(F.col(f"`{id_field}`").cast("string").alias("id")))
    if not frames:
        return spark.createDataFrame([], "id string")
    ids = reduce(DataFrame.unionByName, frames).filter(F.col("id").isNotNull())
    if wanted is not None:
        ids = ids.join(F.broadcast(wanted.select(F.col("ref").alias("id"))), "id", "left_semi")
    return ids.distinct()


# ---------------------------------------------------------------- parsing


def value_column(name: str) -> str:
    return f"v__{name}"


def looks_like_json_literal(text: Column, is_iso_timestamp: Column | None = None) -> Column:
    """Could this text be Spark's rendering of a non-string JSON value (number, true/false,
    object, array)? A cheap first-character test; a valid ISO timestamp never is one."""
    first = F.ascii(text)
    maybe = (first.between(48, 57) | first.isin(45, 91, 123)  # 0-9 - [ {
             | (text == "true") | (text == "false"))
    return maybe if is_iso_timestamp is None else ~is_iso_timestamp & maybe


def parse_records(raw: DataFrame, fields: LogFields, value_pattern: str) -> DataFrame:
    """Typed columns plus ``reason`` (null when the record keeps the contract).

    Fast path: one typed ``from_json``. Spark's parser turns a number or object given for a
    string field into text silently, so rows where a text field looks like a JSON literal
    (and rows the typed parse flags as corrupt) take an exact path: the line is parsed again
    with variant fields and every field's JSON type is checked. Columns out: ``id``, ``ref``
    (foreign key), ``ts``, ``v__<field>`` per other field, ``reason``, ``value``,
    ``source_file``, ``part_day``, ``content_hash`` (a deterministic tie-break)."""
    names = list(fields.kinds)
    is_text = [fields.kinds[n] != "number" for n in names]
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT}
    typed_schema = T.StructType([T.StructField(n, T.StringType() if text else T.DoubleType())
                                 for n, text in zip(names, is_text, strict=True)]
                                + [T.StructField(CORRUPT, T.StringType())])
    variant_schema = T.StructType([T.StructField(n, T.VariantType()) for n in names])
    keep = ["value", "source_file", "part_day"]

    parsed = raw.select(*keep, F.from_json("value", typed_schema, options).alias("_j"))
    timestamps = [i for i, n in enumerate(names) if fields.kinds[n] == "timestamp"]
    parsed = parsed.select(*keep, F.col("_j")[CORRUPT].alias("_corrupt"),
                           *[F.col("_j")[n].alias(f"_v{i}") for i, n in enumerate(names)])
    # The ISO pattern is the costliest per-row test: evaluated once, used twice.
    parsed = parsed.select("*", *[F.col(f"_v{i}").rlike(ISO_TS).alias(f"_iso{i}") for i in timestamps])
    iso = {i: F.col(f"_iso{i}") for i in timestamps}
    # A corrupt record is broken JSON unless it is an object (then a value failed its type).
    parsed = parsed.withColumn("_cobj", F.col("_corrupt").isNotNull() & F.json_object_keys("value").isNotNull())
    literal_text = [F.coalesce(looks_like_json_literal(F.col(f"_v{i}"), iso.get(i)), F.lit(False))
                    for i in range(len(names)) if is_text[i]]
    parsed = parsed.withColumn("_exact", reduce(lambda a, b: a | b, literal_text, F.col("_cobj")))

    flags: list[Column] = []
    for i, name in enumerate(names):
        # Inside CASE WHEN _exact only: the variant parse runs for exact-path rows alone.
        x = F.from_json("value", variant_schema)[name]
        vtype = F.schema_of_variant(x)
        exact_ok = (vtype == "STRING") if is_text[i] else vtype.rlike(NUMERIC_VARIANT)
        exact_absent = x.isNull() | (vtype == "VOID")
        absent = F.when(F.col("_exact"), exact_absent).otherwise(F.col(f"_v{i}").isNull())
        wrong = F.when(F.col("_exact"), ~exact_absent & ~F.coalesce(exact_ok, F.lit(False))).otherwise(False)
        flags += [absent.alias(f"_a{i}"), wrong.alias(f"_w{i}")]
    checked = parsed.select(*keep, "_corrupt", "_cobj", *[f"_v{i}" for i in range(len(names))],
                            *iso.values(), *flags)

    missing: list[Column] = []
    bad_ts: list[Column] = []
    bad_domain: list[Column] = []
    outputs: list[Column] = []
    for i, name in enumerate(names):
        kind, value = fields.kinds[name], F.col(f"_v{i}")
        valid_type = ~F.col(f"_a{i}") & ~F.col(f"_w{i}")
        if kind == "timestamp":
            parsed_ts = F.when(iso[i], value.try_cast("timestamp"))
            bad_ts.append(valid_type & parsed_ts.isNull())
            value = parsed_ts
        if name in fields.required:
            empty = (value == "") if kind == "string" and name not in fields.domain_fields else F.lit(False)
            missing.append(F.col(f"_a{i}") | F.coalesce(empty, F.lit(False)))
        if name in fields.domain_fields:
            bad_domain.append(value.isNull() | ~value.rlike(value_pattern) | value.rlike(LINE_BREAKS))
        outputs.append(value.alias(value_column(name)))

    def any_of(conditions: list[Column]) -> Column:
        return reduce(lambda a, b: a | b, [F.coalesce(c, F.lit(False)) for c in conditions], F.lit(False))

    corrupt = F.col("_corrupt").isNotNull()
    reason = (F.when(~F.is_valid_utf8("value"), F.lit(INVALID_UTF8))
              .when(corrupt & ~F.col("_cobj"), F.lit(MALFORMED_JSON))
              .when(any_of(missing), F.lit(MISSING_FIELD))
              .when(any_of([F.col(f"_w{i}") for i in range(len(names))]) | corrupt, F.lit(WRONG_TYPE))
              .when(any_of(bad_ts), F.lit(BAD_TIMESTAMP))
              .when(any_of(bad_domain), F.lit(UNKNOWN_DOMAIN)))
    out = checked.select(*keep, *outputs, reason.alias("reason"))
    ref = F.col(value_column(fields.ref_field)) if fields.ref_field else F.lit(None).cast("string")
    return out.select(
        F.col(value_column(fields.id_field)).alias("id"),
        ref.alias("ref"),
        F.col(value_column(fields.ts_field)).alias("ts"),
        *[F.col(value_column(n)) for n in names if n not in (fields.id_field, fields.ts_field)],
        "reason", "value", "source_file", "part_day",
        F.xxhash64("value").alias("content_hash"),
    )


def first_by(df: DataFrame, keys: Sequence[str], order: Sequence[str | Column], name: str) -> DataFrame:
    """Adds ``name`` = 1, 2, ... within each key group, in a deterministic order."""
    return df.withColumn(name, F.row_number().over(Window.partitionBy(*keys).orderBy(*order)))


# ---------------------------------------------------------------- impressions


def impression_profile(imps: DataFrame, fields: LogFields) -> tuple[dict[str | None, int], list[tuple[str, str]]]:
    """Record count per reason (None = valid) and the valid domain pairs, in one pass."""
    type_col, scen_col = (value_column(n) for n in fields.domain_fields)
    rows = imps.groupBy("reason", type_col, scen_col).count().collect()
    reasons: dict[str | None, int] = {}
    for r in rows:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + int(r["count"])
    pairs = sorted({(r[type_col], r[scen_col]) for r in rows if r["reason"] is None})
    return reasons, pairs


def update_vocabs(cfg: PipelineConfig, pairs: Sequence[tuple[str, str]]) -> tuple[Vocabulary, Vocabulary]:
    """Load both vocabularies, append new values (ids never change) and save if they grew."""
    pattern = re.compile(cfg.domains.value_pattern)
    vocabs = []
    for i, name in enumerate((cfg.domains.type_field, cfg.domains.scenario_field)):
        vocab = load_vocab(cfg.paths.vocab_dir, name)
        seen = {p[i] for p in pairs}
        if any(not pattern.fullmatch(v) for v in seen):
            raise AssertionError(f"{name}: a value passed Spark's pattern check but not Python's")
        if vocab.extend(seen):
            save_vocab(cfg.paths.vocab_dir, vocab)
        vocabs.append(vocab)
    return vocabs[0], vocabs[1]


def vocab_id_expr(vocab: Vocabulary, value: Column) -> Column:
    if not len(vocab):
        return F.lit(None).cast("int")
    mapping = F.create_map(*[x for v, i in vocab.ids.items() for x in (F.lit(v), F.lit(i))])
    return F.try_element_at(mapping, value).cast("int")


def hashed_impressions(cfg: PipelineConfig, parsed: DataFrame, fields: LogFields) -> DataFrame:
    """Parsed impressions with features hashed straight away (ints are cheaper to hold than
    the raw strings); the raw line and its file are kept only for quarantined records."""
    keep = ["id", "ts", *[value_column(n) for n in fields.domain_fields], "reason", "content_hash"]
    invalid = F.col("reason").isNotNull()
    return parsed.select(
        *keep,
        *[F.when(invalid, F.col(c)).alias(c) for c in ("value", "source_file", "part_day")],
        *[feature_id_expr(f, F.col(value_column(f.name))).alias(f.column) for f in cfg.features],
    )


def repeated_impression_ids(imps: DataFrame) -> DataFrame:
    """Ids of valid impressions seen more than once (small: duplicates are rare)."""
    valid = imps.filter(F.col("reason").isNull())
    return valid.groupBy("id").count().filter(F.col("count") > 1).select("id")


def unique_impressions(cfg: PipelineConfig, imps: DataFrame, fields: LogFields,
                       types: Vocabulary, scenarios: Vocabulary, repeated_ids: DataFrame) -> DataFrame:
    """Valid impressions, one per id, as the samples' columns (labels still to join).

    Duplicates are rare, so only the ``repeated_ids`` (:func:`repeated_impression_ids`; pass
    it cached, it is read twice) are ranked; sorting every row by id would cost a full
    shuffle and sort of the day."""
    valid = imps.filter(F.col("reason").isNull())
    repeated_ids = F.broadcast(repeated_ids)
    # Copies with equal (ts, content_hash) are the same line: which one is kept doesn't matter.
    repeated = first_by(valid.join(repeated_ids, "id", "left_semi"), ["id"], ["ts", "content_hash"], "_rn")
    unique = valid.join(repeated_ids, "id", "left_anti").unionByName(
        repeated.filter(F.col("_rn") == 1).drop("_rn"))
    type_col, scen_col = (F.col(value_column(n)) for n in fields.domain_fields)
    return unique.select(
        F.col("id").alias(fields.id_field),
        F.col("ts"),
        type_col.alias(cfg.domains.type_field),
        scen_col.alias(cfg.domains.scenario_field),
        vocab_id_expr(types, type_col).alias("type_id"),
        vocab_id_expr(scenarios, scen_col).alias("scenario_id"),
        *cfg.feature_columns,
    )


def impression_lookup(spark: SparkSession, cfg: PipelineConfig, imps: DataFrame, day: str,
                      click_refs: DataFrame) -> DataFrame:
    """Ids a click may point to besides day D's valid impressions: quarantined ones of D,
    and those of D-1 and D+1 (``origin`` tells which). Only ids some click refers to are
    kept, by a broadcast semi-join, so two neighbour days of ids are never shuffled."""
    fields = log_fields(cfg, "impressions")
    neighbours = read_ids(spark, cfg, "impressions", [shift(day, -1), shift(day, 1)], fields.id_field, click_refs)
    quarantined = imps.filter(F.col("reason").isNotNull()).select(F.col("id").alias("ref"))
    both = (quarantined.join(F.broadcast(click_refs), "ref", "left_semi")
            .select("ref", F.lit(IMPRESSION_QUARANTINED).alias("origin"))
            .unionByName(neighbours.select(F.col("id").alias("ref"), F.lit(OTHER_IMPRESSION_DAY).alias("origin"))))
    return both.groupBy("ref").agg(F.min("origin").alias("origin"))


# ---------------------------------------------------------------- clicks and conversions


def status_of_invalid(df: DataFrame, day: str) -> DataFrame:
    """Defective records: quarantined by the build of their own partition only."""
    mine = F.col("part_day") == day
    return df.filter(F.col("reason").isNotNull()).select(
        "id", "ref", "ts", "value", "source_file", "part_day",
        F.when(mine, F.lit(QUARANTINED)).otherwise(F.lit(EXPLAINED)).alias("status"),
        F.when(mine, F.col("reason")).otherwise(F.lit(OTHER_PARTITION)).alias("reason"),
    )


def _dedupe(df: DataFrame) -> DataFrame:
    """Valid records ranked per id (``_rn`` = 1 is the copy kept)."""
    return first_by(df.filter(F.col("reason").isNull()), ["id"], ["ts", "content_hash", "source_file"], "_rn")


def _duplicates(ranked: DataFrame) -> DataFrame:
    return ranked.filter(F.col("_rn") > 1).select(
        "id", "ref", "ts", "value", "source_file", "part_day",
        F.lit(EXPLAINED).alias("status"), F.lit(DUPLICATE).alias("reason"))


def child_status(parent_ts: Column, delta: Column, known_elsewhere: Column, mine: Column, *,
                 before_parent: str, not_counted: Sequence[tuple[Column, str]], repeat: str,
                 orphan: str) -> tuple[Column, Column]:
    """(status, reason) of a deduplicated child event: a click of an impression, or a
    conversion of a click. Needs ``_in`` (inside the window) and ``_first`` (rank per parent).

    Matched to a day-D parent: before it -> quarantined; the first one inside the window ->
    used; otherwise explained, the first of ``not_counted`` that holds saying why, else a
    repeat. Unmatched: explained when ``known_elsewhere`` names why; an orphan quarantined
    when it sits in day D's partition; else left to its own partition's build.
    """
    matched = parent_ts.isNotNull()
    status = (F.when(matched,
                     F.when(delta < 0, F.lit(QUARANTINED))
                     .when(F.col("_in") & (F.col("_first") == 1), F.lit(USED))
                     .otherwise(F.lit(EXPLAINED)))
              .when(known_elsewhere.isNotNull(), F.lit(EXPLAINED))
              .when(mine, F.lit(QUARANTINED))
              .otherwise(F.lit(EXPLAINED)))
    why = F.when(delta < 0, F.lit(before_parent))
    for condition, code in not_counted:
        why = why.when(condition, F.lit(code))
    why = why.otherwise(F.when(F.col("_first") > 1, F.lit(repeat)))
    reason = (F.when(matched, why)
              .when(known_elsewhere.isNotNull(), known_elsewhere)
              .when(mine, F.lit(orphan))
              .otherwise(F.lit(OTHER_PARTITION)))
    return status, reason


def classify_clicks(clicks: DataFrame, imp_keys: DataFrame, lookup: DataFrame, day: str,
                    window_us: int) -> DataFrame:
    """One row per click record: ``status`` (used | quarantined | explained) and ``reason``.

    A click counts when it is the first valid click within the click window after a
    valid day-D impression. Also keeps ``imp_matched`` for the conversion join."""
    ranked = _dedupe(clicks)
    unique = (ranked.filter(F.col("_rn") == 1).drop("_rn", "reason")
              .join(imp_keys, on="ref", how="left")
              .join(lookup, on="ref", how="left"))
    delta = F.unix_micros("ts") - F.unix_micros("imp_ts")
    in_window = F.col("imp_ts").isNotNull() & (delta >= 0) & (delta <= window_us)
    # Partitioned like the joins above (by ref), so ranking costs no extra shuffle.
    unique = first_by(unique.withColumn("_in", in_window), ["ref"], [F.col("_in").desc(), "ts", "id"], "_first")
    status, reason = child_status(
        F.col("imp_ts"), delta, F.col("origin"), F.col("part_day") == day, before_parent=CLICK_BEFORE_IMPRESSION,
        not_counted=[(~F.col("_in"), OUTSIDE_CLICK_WINDOW)], repeat=REPEAT_CLICK, orphan=ORPHAN_CLICK)
    classified = unique.select("id", "ref", "ts", "value", "source_file", "part_day",
                               status.alias("status"), reason.alias("reason"),
                               F.col("imp_ts").isNotNull().alias("imp_matched"))
    others = status_of_invalid(clicks, day).unionByName(_duplicates(ranked))
    return classified.unionByName(others.withColumn("imp_matched", F.lit(False)))


def click_lookup(spark: SparkSession, cfg: PipelineConfig, click_status: DataFrame,
                 other_days: Sequence[str]) -> DataFrame:
    """Click ids a conversion may point to besides day D's clicks, with ``kind``:
    other_impression_day (a valid click of another day) or click_invalid."""
    read = click_status.filter(~F.col("imp_matched") & F.col("id").isNotNull()).select(
        F.col("id").alias("ref"),
        F.when(F.col("reason") == OTHER_IMPRESSION_DAY, F.lit(OTHER_IMPRESSION_DAY))
        .otherwise(F.lit(CLICK_INVALID)).alias("kind"))
    ids = read_ids(spark, cfg, "clicks", other_days, cfg.logs["clicks"].id_field)
    elsewhere = ids.select(F.col("id").alias("ref"), F.lit(OTHER_IMPRESSION_DAY).alias("kind"))
    return read.unionByName(elsewhere).groupBy("ref").agg(F.max("kind").alias("kind"))


def classify_conversions(convs: DataFrame, click_status: DataFrame, lookup: DataFrame, day: str,
                         window_us: int) -> DataFrame:
    """One row per conversion record: ``status`` and ``reason``; also ``impression`` (the
    impression id of a used conversion). A conversion counts when it is the first valid
    one within the attribution window after a counted click."""
    day_clicks = click_status.filter(F.col("imp_matched")).select(
        F.col("id").alias("ref"), F.col("ts").alias("click_ts"), F.col("ref").alias("impression"),
        (F.col("status") == USED).alias("counted"))
    ranked = _dedupe(convs)
    unique = (ranked.filter(F.col("_rn") == 1).drop("_rn", "reason")
              .join(day_clicks, on="ref", how="left")
              .join(lookup, on="ref", how="left"))
    delta = F.unix_micros("ts") - F.unix_micros("click_ts")
    candidate = F.col("click_ts").isNotNull() & F.col("counted") & (delta >= 0) & (delta <= window_us)
    unique = first_by(unique.withColumn("_in", candidate), ["ref"], [F.col("_in").desc(), "ts", "id"], "_first")
    status, reason = child_status(
        F.col("click_ts"), delta, F.col("kind"), F.col("part_day") == day, before_parent=CONVERSION_BEFORE_CLICK,
        not_counted=[(~F.col("counted"), CLICK_NOT_COUNTED), (~F.col("_in"), OUTSIDE_ATTRIBUTION_WINDOW)],
        repeat=REPEAT_CONVERSION, orphan=ORPHAN_CONVERSION)
    classified = unique.select("id", "ref", "ts", "value", "source_file", "part_day",
                               status.alias("status"), reason.alias("reason"), "impression")
    others = status_of_invalid(convs, day).unionByName(_duplicates(ranked))
    return classified.unionByName(others.withColumn("impression", F.lit(None).cast("string")))


# ---------------------------------------------------------------- outputs


def label_frame(cfg: PipelineConfig, click_status: DataFrame, conv_status: DataFrame) -> DataFrame:
    """One row per clicked impression: (impression id, click = 1, conversion 0/1). Small:
    a day's counted clicks."""
    imp_id = cfg.logs["impressions"].id_field
    clicked = click_status.filter(F.col("status") == USED).select(F.col("ref").alias(imp_id))
    converted = conv_status.filter(F.col("status") == USED).select(F.col("impression").alias(imp_id),
                                                                   F.lit(1).alias("_v"))
    return clicked.join(converted, imp_id, "left").select(
        imp_id, F.lit(1).alias("click"), F.coalesce(F.col("_v"), F.lit(0)).alias("conversion"))


def samples_frame(cfg: PipelineConfig, unique_imps: DataFrame, labels: DataFrame) -> DataFrame:
    """The contract's samples columns, in order: labels broadcast-joined onto the impressions."""
    imp_id = cfg.logs["impressions"].id_field
    joined = unique_imps.join(F.broadcast(labels), imp_id, "left")
    return joined.select(
        imp_id, "ts", cfg.domains.type_field, cfg.domains.scenario_field, "type_id", "scenario_id",
        *cfg.feature_columns,
        F.coalesce(F.col("click"), F.lit(0)).cast("int").alias("click"),
        F.coalesce(F.col("conversion"), F.lit(0)).cast("int").alias("conversion"),
    )


def quarantine_frame(imps: DataFrame, click_status: DataFrame, conv_status: DataFrame) -> DataFrame:
    """log, reason, raw (made valid UTF-8 so any reader can open it), source_file."""
    def rows(df: DataFrame, log: str, cond: Column) -> DataFrame:
        return df.filter(cond).select(F.lit(log).alias("log"), "reason",
                                      F.make_valid_utf8("value").alias("raw"), "source_file")

    return (rows(imps, "impressions", F.col("reason").isNotNull())
            .unionByName(rows(click_status, "clicks", F.col("status") == QUARANTINED))
            .unionByName(rows(conv_status, "conversions", F.col("status") == QUARANTINED)))


def _staging_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.staging-{uuid.uuid4().hex[:12]}"


def _drop_markers(directory: Path) -> None:
    for p in directory.iterdir():
        if p.name.startswith((".", "_")):
            p.unlink()


def write_staged(df: DataFrame, target: Path) -> Path:
    """Write a complete copy next to ``target``; :func:`swap_in` makes it current."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(target)
    df.write.mode("overwrite").parquet(str(staging))
    _drop_markers(staging)
    return staging


def swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` with two renames, so a reader never sees a mix."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def status_counts(df: DataFrame) -> dict[str, dict[str, int]]:
    """{"used": {"": n}, "quarantined": {reason: n}, "explained": {reason: n}}."""
    out: dict[str, dict[str, int]] = {USED: {}, QUARANTINED: {}, EXPLAINED: {}}
    for row in df.groupBy("status", "reason").count().collect():
        out[row["status"]][row["reason"] or ""] = int(row["count"])
    return out


def _check_invariant(log: str, records: int, used: int, quarantined: dict[str, int],
                     explained: dict[str, int]) -> None:
    total = used + sum(quarantined.values()) + sum(explained.values())
    if total != records:
        raise AccountingError(f"{log}: {records} records but {used} used + {sum(quarantined.values())} "
                              f"quarantined + {sum(explained.values())} explained = {total}")


# ---------------------------------------------------------------- the job


def configure(spark: SparkSession, cfg: PipelineConfig) -> None:
    """Session settings the job's semantics depend on (UTC times, readable timestamps)."""
    spark.conf.set("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    spark.conf.set("spark.sql.inMemoryColumnarStorage.compressed", str(cfg.spark.compress_cache).lower())


def _require_impressions(cfg: PipelineConfig, day: str) -> None:
    try:
        require_impressions(cfg, day)
    except MissingRawLogsError as exc:
        raise MissingInputError(str(exc)) from None


class PhaseTimer:
    """Wall seconds per named phase, for the job's summary (where a day's time goes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def build_day(spark: SparkSession, cfg: PipelineConfig, day: str) -> dict[str, Any]:
    """Build day ``day``'s samples, quarantine and manifest; returns the manifest."""
    timer = PhaseTimer()
    day = dt.date.fromisoformat(day).isoformat()
    _require_impressions(cfg, day)
    configure(spark, cfg)
    click_days, conv_days = partition_spans(cfg)
    fields = {log: log_fields(cfg, log) for log in LOGS}
    pattern = cfg.domains.value_pattern
    persisted: list[DataFrame] = []

    def keep(df: DataFrame) -> DataFrame:
        persisted.append(df.persist(StorageLevel.MEMORY_AND_DISK_DESER))
        return persisted[-1]

    try:
        raw_imps, imp_parts = read_raw(spark, cfg, "impressions", [day])
        imps = keep(hashed_impressions(cfg, parse_records(raw_imps, fields["impressions"], pattern),
                                       fields["impressions"]))
        imp_reasons, domain_pairs = impression_profile(imps, fields["impressions"])
        imp_records = sum(imp_reasons.values())
        if imp_records == 0:
            raise MissingInputError(f"build {day}: the impression files of {day} hold no records")
        types, scenarios = update_vocabs(cfg, domain_pairs)
        timer.lap("parse impressions")
        repeated_ids = keep(repeated_impression_ids(imps))
        unique_imps = keep(unique_impressions(cfg, imps, fields["impressions"], types, scenarios, repeated_ids))
        n_unique = unique_imps.count()
        timer.lap("dedupe and hash")
        imp_keys = unique_imps.select(F.col(fields["impressions"].id_field).alias("ref"), F.col("ts").alias("imp_ts"))

        click_part_days = [shift(day, i) for i in range(click_days + 1)]
        raw_clicks, click_parts = read_raw(spark, cfg, "clicks", click_part_days)
        clicks = keep(parse_records(raw_clicks, fields["clicks"], pattern))
        click_refs = keep(clicks.filter(F.col("ref").isNotNull()).select("ref").distinct())
        # Only the impressions some click points to take part in the click join.
        imp_keys = imp_keys.join(F.broadcast(click_refs), "ref", "left_semi")
        click_status = keep(classify_clicks(clicks, imp_keys, impression_lookup(spark, cfg, imps, day, click_refs),
                                            day, cfg.windows.click_window_minutes * 60_000_000))
        click_counts = status_counts(click_status)
        timer.lap("clicks")

        other_click_days = [shift(day, i) for i in range(-conv_days - 1, conv_days + 1)
                            if shift(day, i) not in click_part_days]
        raw_convs, conv_parts = read_raw(spark, cfg, "conversions", [shift(day, i) for i in range(conv_days + 1)])
        convs = keep(parse_records(raw_convs, fields["conversions"], pattern))
        conv_status = keep(classify_conversions(convs, click_status,
                                                click_lookup(spark, cfg, click_status, other_click_days), day,
                                                cfg.windows.attribution_window_hours * 3_600_000_000))
        conv_counts = status_counts(conv_status)
        timer.lap("conversions")

        keys = ["type_id", "scenario_id", fields["impressions"].id_field]
        labels = keep(label_frame(cfg, click_status, conv_status))
        per_domain, outputs = domain_stats(cfg, unique_imps, labels)
        if outputs["samples"] != n_unique:
            raise AccountingError(f"{outputs['samples']} samples from {n_unique} unique impressions")
        timer.lap("label join")
        samples = samples_frame(cfg, unique_imps, labels)
        samples_stage = write_staged(
            samples.repartitionByRange(cfg.spark.output_files_per_day, *keys).sortWithinPartitions(*keys),
            cfg.paths.samples_dir(day))
        written = sum(pq.read_metadata(p).num_rows for p in samples_stage.glob("*.parquet"))
        if written != outputs["samples"]:
            raise AccountingError(f"wrote {written} sample rows, expected {outputs['samples']}")
        quarantine_stage = write_staged(
            quarantine_frame(imps, click_status, conv_status).coalesce(1).sortWithinPartitions(
                "log", "reason", "source_file", "raw"),
            cfg.paths.quarantine_dir(day))
        timer.lap("write")

        manifest = assemble_manifest(
            cfg, day,
            inputs={"impressions": (imp_parts, imp_records), "clicks": (click_parts, clicks.count()),
                    "conversions": (conv_parts, convs.count())},
            imp_reasons=imp_reasons, samples=outputs["samples"],
            click_counts=click_counts, conv_counts=conv_counts, outputs=outputs, per_domain=per_domain,
        )
        swap_in(samples_stage, cfg.paths.samples_dir(day))
        swap_in(quarantine_stage, cfg.paths.quarantine_dir(day))
        write_json_atomic(cfg.paths.manifest_path(day), manifest)
        timer.lap("manifest")
    finally:
        for df in persisted:
            df.unpersist()
        for leftover in _staging_leftovers(cfg, day):
            shutil.rmtree(leftover, ignore_errors=True)
    _warn_capacity(cfg, types, scenarios)
    print(summary(manifest, timer.seconds, cfg))
    return manifest


def _staging_leftovers(cfg: PipelineConfig, day: str) -> list[Path]:
    found = []
    for target in (cfg.paths.samples_dir(day), cfg.paths.quarantine_dir(day)):
        if target.parent.is_dir():
            found += list(target.parent.glob(f".{target.name}.staging-*"))
    return found


def domain_stats(cfg: PipelineConfig, unique_imps: DataFrame, labels: DataFrame) -> tuple[list[dict], dict[str, int]]:
    """Per-domain and total sample, click and conversion counts, without materializing the
    samples: impressions counted per domain, labels joined onto (small) clicked ones."""
    imp_id = cfg.logs["impressions"].id_field
    domain = [cfg.domains.type_field, cfg.domains.scenario_field, "type_id", "scenario_id"]
    counts = {tuple(r[c] for c in domain): [int(r["count"]), 0, 0]
              for r in unique_imps.groupBy(*domain).count().collect()}
    labelled = (unique_imps.select(imp_id, *domain).join(F.broadcast(labels), imp_id)
                .groupBy(*domain).agg(F.sum("click").alias("c"), F.sum("conversion").alias("v")).collect())
    for r in labelled:
        counts[tuple(r[c] for c in domain)][1:] = [int(r["c"]), int(r["v"])]
    per_domain = [{"conversion_type": k[0], "display_scenario": k[1], "type_id": int(k[2]), "scenario_id": int(k[3]),
                   "samples": n, "clicks": c, "conversions": v}
                  for k, (n, c, v) in sorted(counts.items(), key=lambda kv: (kv[0][2], kv[0][3]))]
    outputs = {key: sum(d[key] for d in per_domain) for key in ("samples", "clicks", "conversions")}
    return per_domain, outputs


def assemble_manifest(cfg: PipelineConfig, day: str, *, inputs: dict[str, tuple[list[str], int]],
                      imp_reasons: dict[str | None, int], samples: int,
                      click_counts: dict[str, dict[str, int]], conv_counts: dict[str, dict[str, int]],
                      outputs: dict[str, int], per_domain: list[dict]) -> dict[str, Any]:
    """The manifest of docs/contracts.md; raises AccountingError if any record is unaccounted."""
    valid_imps = imp_reasons.get(None, 0)
    used = {"impressions": samples, "clicks": click_counts[USED].get("", 0),
            "conversions": conv_counts[USED].get("", 0)}
    quarantined = {"impressions": {r: n for r, n in imp_reasons.items() if r is not None},
                   "clicks": click_counts[QUARANTINED], "conversions": conv_counts[QUARANTINED]}
    explained = {"impressions": {DUPLICATE: valid_imps - samples} if valid_imps > samples else {},
                 "clicks": click_counts[EXPLAINED], "conversions": conv_counts[EXPLAINED]}
    for log in LOGS:
        quarantined[log] = dict(sorted(quarantined[log].items()))
        explained[log] = dict(sorted(explained[log].items()))
        _check_invariant(log, inputs[log][1], used[log], quarantined[log], explained[log])
    if used["clicks"] != outputs["clicks"] or used["conversions"] != outputs["conversions"]:
        raise AccountingError(f"labels written ({outputs}) differ from records used ({used})")
    records = sum(n for _, n in inputs.values())
    n_quarantined = sum(sum(q.values()) for q in quarantined.values())
    return {
        "day": day,
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config_hash": cfg.config_hash(),
        "inputs": {log: {"partitions": parts, "records": n} for log, (parts, n) in inputs.items()},
        "used": used,
        "quarantined": quarantined,
        "explained": explained,
        "outputs": outputs,
        "per_domain": per_domain,
        "quarantine_share": round(n_quarantined / records, 6) if records else 0.0,
    }


def _warn_capacity(cfg: PipelineConfig, types: Vocabulary, scenarios: Vocabulary) -> None:
    if len(types) > cfg.domains.max_types or len(scenarios) > cfg.domains.max_scenarios:
        print(f"WARNING: vocabularies hold {len(types)} types / {len(scenarios)} scenarios, over the model's "
              f"capacity ({cfg.domains.max_types} / {cfg.domains.max_scenarios}): those ids are rejected "
              "at training and serving time", file=sys.stderr)


def summary(manifest: dict[str, Any], phases: dict[str, float], cfg: PipelineConfig) -> str:
    out = manifest["outputs"]
    lines = [f"build {manifest['day']}: {out['samples']} samples, {out['clicks']} clicks, "
             f"{out['conversions']} conversions, {len(manifest['per_domain'])} domains in {sum(phases.values()):.1f}s",
             f"  samples -> {cfg.paths.samples_dir(manifest['day'])}",
             "  phases: " + ", ".join(f"{name} {sec:.1f}s" for name, sec in phases.items())]
    for log in LOGS:
        q, e = manifest["quarantined"][log], manifest["explained"][log]
        lines.append(f"  {log:<11} {manifest['inputs'][log]['records']:>9} records = {manifest['used'][log]} used"
                     f" + {sum(q.values())} quarantined + {sum(e.values())} explained")
        for kind, reasons in (("quarantined", q), ("explained", e)):
            if reasons:
                lines.append(f"      {kind}: " + ", ".join(f"{r}={n}" for r, n in reasons.items()))
    lines.append(f"  quarantine share {manifest['quarantine_share']:.4%}")
    return "\n".join(lines)


def create_session(cfg: PipelineConfig, app_name: str = "mmn-build-samples") -> SparkSession:
    """Use spark-submit's master when launched by it; otherwise the config's."""
    builder = SparkSession.builder.appName(app_name)
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not under spark-submit
        builder = builder.master(cfg.spark.master).config("spark.driver.memory", cfg.spark.driver_memory)
        for key, value in cfg.spark.jvm_conf().items():  # spark-submit passes these itself
            builder = builder.config(key, value)
    return (builder.config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
            .config("spark.sql.session.timeZone", "UTC").getOrCreate())


def _day(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spark-submit spark_jobs/build_samples.py",
        description="Build one impression day's samples (Parquet), quarantine and manifest from the raw logs.")
    parser.add_argument("--day", required=True, type=_day, help="impression day, YYYY-MM-DD")
    return add_config_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, overrides=args.overrides)
    _require_impressions(cfg, args.day)  # fail fast, before starting a JVM
    spark = create_session(cfg)
    spark.sparkContext.setLogLevel("WARN")
    try:
        build_day(spark, cfg, args.day)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
