"""Validate one day's samples partition with Great Expectations before training.

``validate_or_raise`` is what the Airflow task calls: error-severity failures raise
:class:`ValidationFailed` (failing the task); warnings are only logged. Each run stores
``results.json`` beside the partition (``cfg.paths.validation_dir(day)``), updates the
GX Data Docs site under ``<reports_root>/data_docs/gx`` and rewrites the landing page
``<reports_root>/data_docs/index.html``. Reruns for a day replace that day's results.

The suites are in :mod:`validation.suite`, the GX context and runs in
:mod:`validation.gx_context`, the report and ``results.json`` in :mod:`validation.results`.

CLI: ``python -m validation.runner --day 2024-01-08 [--config P] [--set k=v ...]``
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from datetime import date
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.config import PipelineConfig, add_config_arguments, load_config
from core.schedule import parse_day
from core.vocab import commit_staged_vocab, load_day_vocab, load_vocab, staged_conflict
from validation.baseline import load_trailing_stats, read_manifest
from validation.docs import data_docs_dir, write_index
from validation.gx_context import SuiteRun, gx_lock, run_gx
from validation.results import (
    FailedCheck,
    ValidationFailed,
    ValidationReport,
    failed_checks,
    without_missing_column_noise,
    write_results,
)
from validation.suite import ERROR, WARNING, VocabStatus, build_manifest_suite, build_suite, manifest_frame

__all__ = ["ENGINES", "FailedCheck", "ValidationFailed", "ValidationReport", "main", "validate_day",
           "validate_or_raise"]

log = logging.getLogger(__name__)
# GX logs every datasource save at INFO; keep task logs about our checks, not its internals.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

ENGINES = ("pandas", "spark")
_NULLABLE_INTS = {
    pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype(),
}


def validate_or_raise(cfg: PipelineConfig, day: str, *, engine: str = "pandas"
                      ) -> ValidationReport:
    """Validate and raise :class:`ValidationFailed` on any error-severity failure. On success
    the day's staged vocabulary is committed (by :func:`validate_day`)."""
    report = validate_day(cfg, day, engine=engine)
    if not report.success:
        raise ValidationFailed(report)
    return report


def validate_day(cfg: PipelineConfig, day: str, *, engine: str = "pandas") -> ValidationReport:
    """Run the samples and manifest suites for ``day`` and store results and Data Docs.

    The day is checked against the vocabulary its build staged (committed values plus the
    day's new ones); when it passes, that vocabulary is committed
    (:func:`core.vocab.commit_staged_vocab`), so only validated days grow the vocabulary
    training reads. A failed day commits nothing."""
    started = time.perf_counter()
    _check_inputs(cfg, day, engine)
    manifest = read_manifest(cfg, day)
    vocab, vocab_status = _day_vocab(cfg, day)
    suite, severities = build_suite(
        cfg, day, trailing_stats=load_trailing_stats(cfg, day), manifest=manifest,
        vocab=vocab, engine=engine,
    )
    m_suite, m_severities = build_manifest_suite(cfg, day, vocab_fields=list(vocab_status))
    samples, n_rows = _read_samples(cfg, day, engine)
    runs = [
        SuiteRun(suite, severities, f"samples_{engine}", engine, samples),
        SuiteRun(m_suite, m_severities, "manifest", "pandas",
                  manifest_frame(cfg, day, manifest, vocab_status)),
    ]
    results, docs_pages = run_gx(cfg, day, runs)
    failed = without_missing_column_noise([
        check for run in runs for check in failed_checks(results[run.suite.name][1],
                                                          run.severities)
    ])
    report = ValidationReport(
        success=not any(c.severity == ERROR for c in failed),
        day=day,
        n_rows=n_rows,
        errors=[c for c in failed if c.severity == ERROR],
        warnings=[c for c in failed if c.severity == WARNING],
        results_path=cfg.paths.validation_dir(day) / "results.json",
        data_docs_dir=data_docs_dir(cfg),
        data_docs_index=data_docs_dir(cfg) / "index.html",
        notes=[note for run in runs for note in run.suite.notes or []],
        engine=engine,
        seconds=time.perf_counter() - started,
    )
    write_results(report, results, docs_pages)
    with gx_lock(cfg):
        write_index(cfg)
    if report.success:
        for name, values in commit_staged_vocab(cfg.paths.vocab_dir, day).items():
            log.info("dt=%s committed %d new %s value(s): %s", day, len(values), name, ", ".join(values))
    for check in report.warnings:
        log.warning("dt=%s validation warning %s", day, check.describe())
    return report


def _day_vocab(cfg: PipelineConfig, day: str) -> tuple[dict[str, Any], dict[str, VocabStatus]]:
    """The vocabularies the day's samples were encoded with, and each one's status against
    the committed vocabulary (size, capacity, the day's new values, a conflict)."""
    vocab: dict[str, Any] = {}
    status: dict[str, VocabStatus] = {}
    capacities = {cfg.domains.type_field: cfg.domains.max_types,
                  cfg.domains.scenario_field: cfg.domains.max_scenarios}
    for name, capacity in capacities.items():
        day_vocab = load_day_vocab(cfg.paths.vocab_dir, day, name)
        committed = load_vocab(cfg.paths.vocab_dir, name)
        vocab[name] = day_vocab
        status[name] = VocabStatus(
            size=len(day_vocab), capacity=capacity,
            new_values=tuple(v for v in day_vocab.values() if v not in committed),
            conflict=staged_conflict(committed, day_vocab))
    return vocab, status


def _check_inputs(cfg: PipelineConfig, day: str, engine: str) -> None:
    date.fromisoformat(day)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    samples_dir = cfg.paths.samples_dir(day)
    if not samples_dir.is_dir():
        raise FileNotFoundError(f"no samples partition for dt={day} at {samples_dir}")


# --- reading -------------------------------------------------------------------------


def _read_samples(cfg: PipelineConfig, day: str, engine: str) -> tuple[Any, int]:
    """The partition as a pandas or Spark DataFrame, and its row count."""
    path = cfg.paths.samples_dir(day)
    if engine == "spark":
        df = _spark_session(cfg).read.parquet(str(path))
        return df, df.count()
    table = pq.read_table(path)
    frame = table.to_pandas()
    # An int column holding nulls would become float64; a nullable int dtype keeps it
    # int32 so a null id fails only the null check. Plain numpy ints elsewhere: faster.
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_integer(column.type) and column.null_count:
            frame[name] = column.to_pandas(types_mapper=_NULLABLE_INTS.get)
    return frame, len(frame)


def _spark_session(cfg: PipelineConfig) -> Any:
    from pyspark.sql import SparkSession

    return (
        SparkSession.builder.master(cfg.spark.master)
        .appName("mmn-validation")
        .config("spark.driver.memory", cfg.spark.driver_memory)
        .config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )



# --- CLI -----------------------------------------------------------------------------


def _iso_day(text: str) -> str:
    try:
        return parse_day(text).isoformat()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m validation.runner",
        description="Validate one day's samples partition with Great Expectations. "
        "Exit code 1 when any error-severity check fails (warnings are only logged).",
    )
    parser.add_argument("--day", required=True, type=_iso_day, help="day to validate, YYYY-MM-DD")
    add_config_arguments(parser)
    parser.add_argument("--engine", choices=ENGINES, default="pandas",
                        help="reader / GX execution engine (default: pandas)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    cfg = load_config(args.config, overrides=args.overrides)
    try:
        report = validate_or_raise(cfg, args.day, engine=args.engine)
    except ValidationFailed as exc:
        print(exc.report.summary(), file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"validation of dt={args.day} FAILED: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
