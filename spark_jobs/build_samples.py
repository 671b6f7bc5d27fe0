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

This file is the entry point and the day's driver; the steps live beside it in
``spark_jobs/``: :mod:`~spark_jobs.sources` (what to read), :mod:`~spark_jobs.parse`,
:mod:`~spark_jobs.impressions`, :mod:`~spark_jobs.labels` (clicks, conversions, labels),
:mod:`~spark_jobs.outputs` (frames, staging, swap) and :mod:`~spark_jobs.manifest`;
:mod:`~spark_jobs.reasons` names the reason codes.

Shipping the code: spark-submit runs this file as a script, so it puts the repository root
on ``sys.path`` below and the ``core`` and ``spark_jobs`` packages import from the working
tree. Only the driver imports them: the job's logic is Spark SQL expressions alone (no Python
UDF, no RDD lambda), so nothing an executor runs refers to this package's code, on
``local[*]`` and on a cluster alike. On a cluster in client mode
nothing more is needed; in cluster deploy mode the driver itself runs on a cluster node,
so ship the packages with ``--py-files`` (a zip of ``core/`` and ``spark_jobs/``) or
install the project there. Should a Python UDF ever be added, executors would need the
same ``--py-files``. The sibling modules must not be named like a top-level module
(``types``, ``json``, ...): this file's directory is also first on ``sys.path``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:  # spark-submit runs this file without installing the package
    sys.path.insert(0, _REPO_ROOT)

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
from pyspark import StorageLevel  # noqa: E402
from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from core.config import ConfigError, PipelineConfig, add_config_arguments, load_config  # noqa: E402
from core.contracts import DOMAIN_COLUMNS, TS, sample_id_column  # noqa: E402
from core.raw_inputs import MissingRawLogsError, require_impressions  # noqa: E402
from core.schedule import parse_day  # noqa: E402
from core.threads import policy_for, spark_master  # noqa: E402
from spark_jobs.impressions import (  # noqa: E402
    conflicting_raw,
    hashed_impressions,
    impression_lookup,
    impression_profile,
    mark_conflicting,
    repeated_impression_ids,
    stage_vocabs,
    unique_impressions,
)
from spark_jobs.labels import classify_clicks, classify_conversions, click_lookup, label_frame  # noqa: E402
from spark_jobs.manifest import assemble_manifest, domain_stats, status_counts, summary, warn_capacity  # noqa: E402
from spark_jobs.outputs import (  # noqa: E402
    quarantine_frame,
    samples_frame,
    staging_leftovers,
    swap_in,
    write_json_atomic,
    write_staged,
)
from spark_jobs.parse import parse_records  # noqa: E402
from spark_jobs.reasons import LOGS, AccountingError, MissingInputError  # noqa: E402
from spark_jobs.sources import RawFiles, log_fields, partition_spans, read_raw, shift  # noqa: E402


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
    click_days, conv_days = partition_spans(cfg)
    fields = {log: log_fields(cfg, log) for log in LOGS}
    pattern = cfg.domains.value_pattern
    tolerance = cfg.spark.event_time_tolerance_minutes
    persisted: list[DataFrame] = []
    click_part_days = [shift(day, i) for i in range(click_days + 1)]
    conv_part_days = [shift(day, i) for i in range(conv_days + 1)]
    other_click_days = [shift(day, i) for i in range(-conv_days - 1, conv_days + 1)
                        if shift(day, i) not in click_part_days]
    files = RawFiles(cfg)
    files.prefetch([("impressions", d) for d in (shift(day, -1), day, shift(day, 1))]
                   + [("clicks", d) for d in click_part_days + other_click_days]
                   + [("conversions", d) for d in conv_part_days])
    files.require_within(cfg.spark.max_lost_bytes_share)
    configure(spark, cfg)

    def keep(df: DataFrame) -> DataFrame:
        persisted.append(df.persist(StorageLevel.MEMORY_AND_DISK_DESER))
        return persisted[-1]

    try:
        raw_imps, imp_parts = read_raw(spark, files, "impressions", [day])
        parsed_imps = keep(hashed_impressions(
            cfg, parse_records(raw_imps, fields["impressions"], pattern, tolerance_minutes=tolerance),
            fields["impressions"]))
        repeated_ids = keep(repeated_impression_ids(parsed_imps))
        imps = mark_conflicting(parsed_imps, repeated_ids)
        imp_reasons, domain_pairs = impression_profile(imps, fields["impressions"])
        imp_records = sum(imp_reasons.values())
        if imp_records == 0:
            raise MissingInputError(f"build {day}: the impression files of {day} hold no records")
        types, scenarios = stage_vocabs(cfg, day, domain_pairs)
        timer.lap("parse impressions")
        unique_imps = keep(unique_impressions(cfg, imps, fields["impressions"], types, scenarios, repeated_ids))
        n_unique = unique_imps.count()
        timer.lap("dedupe and hash")
        imp_keys = unique_imps.select(F.col(sample_id_column(cfg)).alias("ref"), F.col(TS).alias("imp_ts"))

        raw_clicks, click_parts = read_raw(spark, files, "clicks", click_part_days)
        clicks = keep(parse_records(raw_clicks, fields["clicks"], pattern, tolerance_minutes=tolerance))
        click_refs = keep(clicks.filter(F.col("ref").isNotNull()).select("ref").distinct())
        # Only the impressions some click points to take part in the click join.
        imp_keys = imp_keys.join(F.broadcast(click_refs), "ref", "left_semi")
        click_status = keep(classify_clicks(clicks, imp_keys, impression_lookup(spark, cfg, files, imps, day, click_refs),
                                            day, cfg.windows.click_window_minutes * 60_000_000))
        click_counts = status_counts(click_status)
        timer.lap("clicks")

        raw_convs, conv_parts = read_raw(spark, files, "conversions", conv_part_days)
        convs = keep(parse_records(raw_convs, fields["conversions"], pattern, tolerance_minutes=tolerance))
        conv_status = keep(classify_conversions(convs, click_status,
                                                click_lookup(spark, cfg, files, click_status, other_click_days), day,
                                                cfg.windows.attribution_window_hours * 3_600_000_000))
        conv_counts = status_counts(conv_status)
        timer.lap("conversions")

        keys = [*DOMAIN_COLUMNS, sample_id_column(cfg)]
        labels = keep(label_frame(cfg, click_status, conv_status))
        per_domain, outputs, missing = domain_stats(cfg, unique_imps, labels)
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
            quarantine_frame(imps, click_status, conv_status,
                             conflicting_raw(raw_imps, repeated_ids, fields["impressions"], pattern, tolerance))
            .coalesce(1).sortWithinPartitions(
                "log", "reason", "source_file", "raw"),
            cfg.paths.quarantine_dir(day))
        timer.lap("write")

        manifest = assemble_manifest(
            cfg, day,
            inputs={"impressions": (imp_parts, imp_records), "clicks": (click_parts, clicks.count()),
                    "conversions": (conv_parts, convs.count())},
            imp_reasons=imp_reasons, samples=outputs["samples"],
            click_counts=click_counts, conv_counts=conv_counts, outputs=outputs, per_domain=per_domain,
            files=files.report(), missing=missing,
        )
        swap_in(samples_stage, cfg.paths.samples_dir(day))
        swap_in(quarantine_stage, cfg.paths.quarantine_dir(day))
        write_json_atomic(cfg.paths.manifest_path(day), manifest)
        timer.lap("manifest")
    finally:
        for df in persisted:
            df.unpersist()
        for leftover in staging_leftovers(cfg, day):
            shutil.rmtree(leftover, ignore_errors=True)
    warn_capacity(cfg, types, scenarios)
    print(summary(manifest, timer.seconds, cfg))
    return manifest


def create_session(cfg: PipelineConfig, app_name: str = "mmn-build-samples") -> SparkSession:
    """Use spark-submit's master when launched by it; otherwise the config's."""
    builder = SparkSession.builder.appName(app_name)
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not under spark-submit
        # local[*] takes the thread policy's cores (runtime.spark_cores; core.threads).
        master = spark_master(cfg.spark.master, policy_for(cfg).spark_cores)
        builder = builder.master(master).config("spark.driver.memory", cfg.spark.driver_memory)
        for key, value in cfg.spark.jvm_conf().items():  # spark-submit passes these itself
            builder = builder.config(key, value)
    return (builder.config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
            .config("spark.sql.session.timeZone", "UTC").getOrCreate())


def _day(text: str) -> str:
    try:
        return parse_day(text).isoformat()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spark-submit spark_jobs/build_samples.py",
        description="Build one impression day's samples (Parquet), quarantine and manifest from the raw logs.")
    parser.add_argument("--day", required=True, type=_day, help="impression day, YYYY-MM-DD")
    parser.add_argument("--config-hash", help="refuse to run unless the effective config (--config, "
                        "$MMN__*, --set) has this hash: the submitter's (mmn.build.build_job_args)")
    return add_config_arguments(parser)


def job_config(args: argparse.Namespace) -> PipelineConfig:
    """The job's effective config from its arguments, checked against the submitter's hash."""
    cfg = load_config(args.config, overrides=args.overrides)
    if args.config_hash and cfg.config_hash() != args.config_hash:
        raise ConfigError(
            f"the build job's effective config (hash {cfg.config_hash()}) is not the submitter's "
            f"({args.config_hash}): an MMN__* variable of the job's environment differs from the "
            "submitter's; set the value with --set or align the environments")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = job_config(args)
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
