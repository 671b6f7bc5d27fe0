"""Labels: every click and conversion record classified as used, quarantined or explained
(with its reason), and the day's labels (click, conversion) per clicked impression.

A record is quarantined by exactly one day's build: defects and orphans by the build of
the partition the record sits in, join defects (before its parent) by the build of the
impression's day; records of neighbouring partitions read only for the joins are explained.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from core.config import PipelineConfig
from core.contracts import CLICK, CONVERSION, sample_id_column
from spark_jobs.parse import first_by
from spark_jobs.reasons import (
    CLICK_BEFORE_IMPRESSION,
    CLICK_INVALID,
    CLICK_NOT_COUNTED,
    CONVERSION_BEFORE_CLICK,
    DUPLICATE,
    EXPLAINED,
    ORPHAN_CLICK,
    ORPHAN_CONVERSION,
    OTHER_IMPRESSION_DAY,
    OTHER_PARTITION,
    OUTSIDE_ATTRIBUTION_WINDOW,
    OUTSIDE_CLICK_WINDOW,
    QUARANTINED,
    REPEAT_CLICK,
    REPEAT_CONVERSION,
    USED,
)
from spark_jobs.sources import RawFiles, read_ids


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


def click_lookup(spark: SparkSession, cfg: PipelineConfig, files: RawFiles, click_status: DataFrame,
                 other_days: Sequence[str]) -> DataFrame:
    """Click ids a conversion may point to besides day D's clicks, with ``kind``:
    other_impression_day (a valid click of another day) or click_invalid."""
    read = click_status.filter(~F.col("imp_matched") & F.col("id").isNotNull()).select(
        F.col("id").alias("ref"),
        F.when(F.col("reason") == OTHER_IMPRESSION_DAY, F.lit(OTHER_IMPRESSION_DAY))
        .otherwise(F.lit(CLICK_INVALID)).alias("kind"))
    ids = read_ids(spark, files, "clicks", other_days, cfg.logs["clicks"].id_field)
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


def label_frame(cfg: PipelineConfig, click_status: DataFrame, conv_status: DataFrame) -> DataFrame:
    """One row per clicked impression: (impression id, click = 1, conversion 0/1). Small:
    a day's counted clicks."""
    imp_id = sample_id_column(cfg)
    clicked = click_status.filter(F.col("status") == USED).select(F.col("ref").alias(imp_id))
    converted = conv_status.filter(F.col("status") == USED).select(F.col("impression").alias(imp_id),
                                                                   F.lit(1).alias("_v"))
    return clicked.join(converted, imp_id, "left").select(
        imp_id, F.lit(1).alias(CLICK), F.coalesce(F.col("_v"), F.lit(0)).alias(CONVERSION))
