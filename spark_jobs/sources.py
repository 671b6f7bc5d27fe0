"""What a day's build reads: each log's fields and kinds from the config, which partitions
can hold a day's clicks and conversions, and the raw records (JSON lines as text, Parquet
rows turned into JSON) so that one parser sees every record.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.config import ConfigError, PipelineConfig
from core.raw_inputs import data_files

KIND_OF_TYPE = {"string": "string", "timestamp": "timestamp", "double": "number", "float": "number",
                "number": "number", "int": "number", "integer": "number", "long": "number", "bigint": "number"}


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
