"""Impressions: feature hashing as Spark expressions, the domain vocabularies, and day D's
valid impressions deduplicated into the samples' columns (labels are joined later).

The hashing expressions must equal :mod:`core.hashing` bit for bit (serving hashes in
Python): tests/test_hashing_parity.py holds them to it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import reduce

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from core.config import FeatureField, PipelineConfig
from core.contracts import SCENARIO_ID, TS, TYPE_ID, feature_columns, sample_id_column
from core.vocab import Vocabulary, load_vocab, stage_vocab
from spark_jobs.parse import first_by, parse_records, value_column
from spark_jobs.reasons import CONFLICTING_DUPLICATE, IMPRESSION_QUARANTINED, OTHER_IMPRESSION_DAY
from spark_jobs.sources import LogFields, RawFiles, log_fields, read_ids, shift

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


def stage_vocabs(cfg: PipelineConfig, day: str, pairs: Sequence[tuple[str, str]]) -> tuple[Vocabulary, Vocabulary]:
    """The committed vocabularies plus the day's new values (ids never change), staged for
    ``day`` only: validation commits them when the day passes (core.vocab.commit_staged_vocab),
    so a junk day's values never reach the vocabulary training reads."""
    pattern = re.compile(cfg.domains.value_pattern)
    vocabs = []
    for i, name in enumerate((cfg.domains.type_field, cfg.domains.scenario_field)):
        vocab = load_vocab(cfg.paths.vocab_dir, name)
        seen = {p[i] for p in pairs}
        if any(not pattern.fullmatch(v) for v in seen):
            raise AssertionError(f"{name}: a value passed Spark's pattern check but not Python's")
        vocab.extend(seen)
        stage_vocab(cfg.paths.vocab_dir, day, vocab)
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
        *keep, fields_hash(parsed, fields).alias("fields_hash"),
        *[F.when(invalid, F.col(c)).alias(c) for c in ("value", "source_file", "part_day")],
        *[feature_id_expr(f, F.col(value_column(f.name))).alias(f.column) for f in cfg.features],
    )


def fields_hash(parsed: DataFrame, fields: LogFields) -> Column:
    """A hash of every parsed contract field but the id: equal for two copies of one record
    however their lines are spelled (key order, spacing). Each field is hashed on its own
    first, since Spark's multi-column hash skips nulls and would equate ("a", null) with
    (null, "a")."""
    columns = ["ts", *[value_column(n) for n in fields.kinds if n not in (fields.id_field, fields.ts_field)]]
    return F.xxhash64(*[F.xxhash64(F.col(c)) for c in columns if c in parsed.columns])


def repeated_impression_ids(imps: DataFrame) -> DataFrame:
    """Ids of valid impressions seen more than once, with ``conflicting``: whether the copies
    differ in content (small: duplicates are rare)."""
    valid = imps.filter(F.col("reason").isNull())
    return (valid.groupBy("id")
            .agg(F.count(F.lit(1)).alias("n"),
                 (F.min("fields_hash") != F.max("fields_hash")).alias("conflicting"))
            .filter(F.col("n") > 1).select("id", "conflicting"))


def mark_conflicting(imps: DataFrame, repeated_ids: DataFrame) -> DataFrame:
    """Every valid copy of an id whose copies disagree becomes ``conflicting_duplicate``:
    which copy is the real impression cannot be told, so none is trained on."""
    conflicts = F.broadcast(repeated_ids.filter("conflicting").select("id", F.lit(True).alias("_conflict")))
    marked = imps.join(conflicts, "id", "left")
    reason = F.when(F.col("reason").isNull() & F.col("_conflict").isNotNull(),
                    F.lit(CONFLICTING_DUPLICATE)).otherwise(F.col("reason"))
    return marked.withColumn("reason", reason).drop("_conflict")


def conflicting_raw(raw: DataFrame, repeated_ids: DataFrame, fields: LogFields, value_pattern: str,
                    tolerance_minutes: float | None) -> DataFrame:
    """The raw lines of the conflicting copies (for the quarantine table: the persisted
    impressions keep raw text only for records that failed parsing). Lines are picked by
    a cheap id lookup, then only those are parsed again."""
    conflict_ids = repeated_ids.filter("conflicting").select(F.col("id").alias("_cid"))
    line_id = F.get_json_object("value", f"$['{fields.id_field}']")
    candidates = raw.join(F.broadcast(conflict_ids), line_id == F.col("_cid"), "left_semi")
    parsed = parse_records(candidates, fields, value_pattern, tolerance_minutes=tolerance_minutes)
    return (parsed.filter(F.col("reason").isNull())
            .join(F.broadcast(conflict_ids.withColumnRenamed("_cid", "id")), "id", "left_semi")
            .select("value", "source_file", F.lit(CONFLICTING_DUPLICATE).alias("reason")))


def unique_impressions(cfg: PipelineConfig, imps: DataFrame, fields: LogFields,
                       types: Vocabulary, scenarios: Vocabulary, repeated_ids: DataFrame) -> DataFrame:
    """Valid impressions, one per id, as the samples' columns (labels still to join).

    Duplicates are rare, so only the ``repeated_ids`` (:func:`repeated_impression_ids`; pass
    it cached, it is read twice) are ranked; sorting every row by id would cost a full
    shuffle and sort of the day."""
    valid = imps.filter(F.col("reason").isNull())
    repeated_ids = F.broadcast(repeated_ids.select("id"))
    # Copies of an id left valid have equal parsed content (mark_conflicting took the others):
    # which one is kept doesn't matter.
    repeated = first_by(valid.join(repeated_ids, "id", "left_semi"), ["id"], ["ts", "content_hash"], "_rn")
    unique = valid.join(repeated_ids, "id", "left_anti").unionByName(
        repeated.filter(F.col("_rn") == 1).drop("_rn"))
    type_col, scen_col = (F.col(value_column(n)) for n in fields.domain_fields)
    return unique.select(
        F.col("id").alias(sample_id_column(cfg)),
        F.col("ts").alias(TS),
        type_col.alias(cfg.domains.type_field),
        scen_col.alias(cfg.domains.scenario_field),
        vocab_id_expr(types, type_col).alias(TYPE_ID),
        vocab_id_expr(scenarios, scen_col).alias(SCENARIO_ID),
        *feature_columns(cfg),
    )


def impression_lookup(spark: SparkSession, cfg: PipelineConfig, files: RawFiles, imps: DataFrame, day: str,
                      click_refs: DataFrame) -> DataFrame:
    """Ids a click may point to besides day D's valid impressions: quarantined ones of D,
    and those of D-1 and D+1 (``origin`` tells which). Only ids some click refers to are
    kept, by a broadcast semi-join, so two neighbour days of ids are never shuffled."""
    fields = log_fields(cfg, "impressions")
    neighbours = read_ids(spark, files, "impressions", [shift(day, -1), shift(day, 1)], fields.id_field, click_refs)
    quarantined = imps.filter(F.col("reason").isNotNull()).select(F.col("id").alias("ref"))
    both = (quarantined.join(F.broadcast(click_refs), "ref", "left_semi")
            .select("ref", F.lit(IMPRESSION_QUARANTINED).alias("origin"))
            .unionByName(neighbours.select(F.col("id").alias("ref"), F.lit(OTHER_IMPRESSION_DAY).alias("origin"))))
    return both.groupBy("ref").agg(F.min("origin").alias("origin"))
