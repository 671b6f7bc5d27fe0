"""What a day's build reads: each log's fields and kinds from the config, which partitions
can hold a day's clicks and conversions, which files of a partition are read (and why any
other is not), and the raw records (JSON lines as text, Parquet rows turned into JSON) so
that one parser sees every record.

Every file under a partition is accounted for, like every record: read, skipped with a
reason (a name the contract does not cover, a marker, an empty file) or corrupt (a gzip
stream that does not decompress to its end, a Parquet file without a readable footer).
Corrupt files are left out and named with their error in the manifest; the day fails only
when they hold more than ``spark.max_lost_bytes_share`` of a log's bytes.
"""

from __future__ import annotations

import datetime as dt
import gzip
import math
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.config import ConfigError, PipelineConfig
from core.raw_inputs import TEXT_SUFFIXES
from spark_jobs.reasons import LOGS, CorruptInputError

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


SUPPORTED = "not a data file name: read are *.jsonl, *.json (either optionally .gz) and *.parquet, lower case"
_CHUNK = 1 << 20


@dataclass
class PartitionFiles:
    """One partition's files: read (text, parquet), skipped and corrupt, with byte counts."""

    text: list[str] = field(default_factory=list)
    parquet: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    corrupt: list[tuple[str, str, int]] = field(default_factory=list)  # (path, error, bytes)
    bytes_read: int = 0


def _gzip_error(path: str) -> str | None:
    """Why the gzip file does not decompress to its end (truncated, bad CRC...), or None."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(_CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _parquet_error(path: str) -> str | None:
    try:
        pq.ParquetFile(path).metadata  # noqa: B018 - reading the footer is the check
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        return f"{type(exc).__name__}: {exc}"
    return None


def list_partition(directory: Path) -> PartitionFiles:
    """Sort a partition's entries into read / skipped (with a reason) / to be checked."""
    out = PartitionFiles()
    if not directory.is_dir():
        return out
    for p in sorted(directory.iterdir()):
        name = p.name
        if p.is_dir():
            out.skipped.append((str(p), "a directory: partitions are read one level deep"))
        elif name.startswith("."):
            out.skipped.append((str(p), "hidden file"))
        elif name.startswith("_"):
            out.skipped.append((str(p), "marker file"))
        elif not name.endswith((*TEXT_SUFFIXES, ".parquet")):
            out.skipped.append((str(p), SUPPORTED))
        elif p.stat().st_size == 0:
            out.skipped.append((str(p), "empty file (0 bytes, no records)"))
        elif name.endswith(".parquet"):
            out.parquet.append(str(p))
        else:
            out.text.append(str(p))
    return out


class RawFiles:
    """The files a build reads, listed and integrity-checked once per partition.

    Gzip members are decompressed to their end on the driver (in threads: zlib releases the
    GIL) because Spark reports a truncated stream only as a failed task deep in a trace, and
    fails the whole day with it; Parquet files must have a readable footer."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.partitions: dict[tuple[str, str], PartitionFiles] = {}

    def partition(self, log: str, day: str) -> PartitionFiles:
        key = (log, day)
        if key not in self.partitions:
            self.partitions[key] = self._check(list_partition(self.cfg.paths.raw_dir(log, day)))
        return self.partitions[key]

    def prefetch(self, wanted: Sequence[tuple[str, str]]) -> None:
        """List and check many partitions at once (the checks of all their files in parallel)."""
        todo = [k for k in dict.fromkeys(wanted) if k not in self.partitions]
        listed = {k: list_partition(self.cfg.paths.raw_dir(*k)) for k in todo}
        gz = [p for files in listed.values() for p in files.text if p.endswith(".gz")]
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            errors = dict(zip(gz, pool.map(_gzip_error, gz), strict=True))
        for key, files in listed.items():
            self.partitions[key] = self._check(files, errors)

    @staticmethod
    def _check(files: PartitionFiles, gz_errors: dict[str, str | None] | None = None) -> PartitionFiles:
        checked = PartitionFiles(skipped=list(files.skipped))
        for path in files.text:
            error = (gz_errors[path] if gz_errors is not None and path in gz_errors
                     else _gzip_error(path) if path.endswith(".gz") else None)
            _sort(checked, checked.text, path, error)
        for path in files.parquet:
            _sort(checked, checked.parquet, path, _parquet_error(path))
        return checked

    def lost_shares(self) -> dict[str, float]:
        """Per log: bytes in corrupt files / bytes of all its data files the build touched."""
        shares = {}
        for log in LOGS:
            parts = [f for (lg, _), f in self.partitions.items() if lg == log]
            lost = sum(b for f in parts for _, _, b in f.corrupt)
            total = lost + sum(f.bytes_read for f in parts)
            shares[log] = round(lost / total, 6) if total else 0.0
        return shares

    def require_within(self, max_share: float) -> None:
        """Raise CorruptInputError, naming the files, when a log lost more than ``max_share``."""
        over = {log: s for log, s in self.lost_shares().items() if s > max_share}
        if over:
            named = "; ".join(f"{path} ({error})" for (log, _), f in sorted(self.partitions.items())
                              if log in over for path, error, _ in f.corrupt)
            shares = ", ".join(f"{log} {s:.2%}" for log, s in over.items())
            raise CorruptInputError(f"corrupt input files hold {shares} of the bytes read, over "
                                    f"spark.max_lost_bytes_share={max_share}: {named}")

    def report(self) -> dict[str, Any]:
        """The manifest's ``files`` section: per log, files read, skipped and corrupt."""
        root = self.cfg.paths.raw_root

        def rel(path: str) -> str:
            p = Path(path)
            return str(p.relative_to(root)) if p.is_relative_to(root) else path

        shares = self.lost_shares()
        out: dict[str, Any] = {}
        for log in LOGS:
            parts = sorted((d, f) for (lg, d), f in self.partitions.items() if lg == log)
            out[log] = {
                "read": [rel(p) for _, f in parts for p in sorted(f.text + f.parquet)],
                "skipped": [{"file": rel(p), "reason": r} for _, f in parts for p, r in f.skipped],
                "corrupt": [{"file": rel(p), "error": e, "bytes": b} for _, f in parts for p, e, b in f.corrupt],
                "lost_bytes_share": shares[log],
            }
        return out


def _sort(checked: PartitionFiles, readable: list[str], path: str, error: str | None) -> None:
    size = os.path.getsize(path)
    if error is None:
        readable.append(path)
        checked.bytes_read += size
    else:
        checked.corrupt.append((path, error, size))


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


def read_raw(spark: SparkSession, files: RawFiles, log: str, days: Sequence[str]) -> tuple[DataFrame, list[str]]:
    """Raw records as text (``value``, ``source_file``, ``part_day``) and the partitions found.

    JSON lines are read as text (gzip by extension); a Parquet record becomes the JSON of
    its row, so both go through one parser. Blank lines are not records."""
    frames: list[DataFrame] = []
    found: list[str] = []
    for day in days:
        part = files.partition(log, day)
        text, parquet = part.text, part.parquet
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


def read_ids(spark: SparkSession, files: RawFiles, log: str, days: Sequence[str], id_field: str,
             wanted: DataFrame | None = None) -> DataFrame:
    """Only the ids of a log's partitions (for telling a neighbour day's record from an orphan),
    optionally only those in ``wanted`` (a small one-column ``ref`` frame, broadcast)."""
    frames: list[DataFrame] = []
    for day in days:
        part = files.partition(log, day)
        text, parquet = part.text, part.parquet
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
