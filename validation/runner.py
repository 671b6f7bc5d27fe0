"""Validate one day's samples partition with Great Expectations before training.

``validate_or_raise`` is what the Airflow task calls: error-severity failures raise
:class:`ValidationFailed` (failing the task); warnings are only logged. Each run stores
``results.json`` beside the partition (``cfg.paths.validation_dir(day)``), updates the
GX Data Docs site under ``<reports_root>/data_docs/gx`` and rewrites the landing page
``<reports_root>/data_docs/index.html``. Reruns for a day replace that day's results.

CLI: ``python -m validation.runner --day 2024-01-08 [--config P] [--set k=v ...]``
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import great_expectations as gx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.exceptions import DataContextError

from core.config import PipelineConfig, add_config_arguments, load_config
from validation.baseline import load_domain_vocab, load_trailing_stats, read_manifest
from validation.docs import data_docs_dir, write_index
from validation.suite import (
    ERROR,
    MANIFEST_SUITE,
    SAMPLES_SUITE,
    WARNING,
    build_manifest_suite,
    build_suite,
    manifest_frame,
)

log = logging.getLogger(__name__)
# GX logs every datasource save at INFO; keep task logs about our checks, not its internals.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

ENGINES = ("pandas", "spark")
SITE_NAME = "mmn_data_docs"
_NULLABLE_INTS = {
    pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype(),
}
_EXISTS = "expect_column_to_exist"
_KWARGS_NOT_EXPECTED = {"batch_id", "column", "column_A", "column_B", "row_condition",
                        "condition_parser"}


@dataclass(frozen=True)
class FailedCheck:
    """One failed expectation: GX name, column, what was seen and what was expected."""

    name: str  # GX expectation type, e.g. expect_column_values_to_be_unique
    column: str | None
    observed: Any
    expected: str
    check: str = ""  # stable check id from the suite, e.g. unique:impression_id
    severity: str = ERROR

    def describe(self) -> str:
        target = f"({self.column})" if self.column else ""
        return (f"{self.check}: {self.name}{target} observed {_short(self.observed)}"
                f" (expected {_short(self.expected, 120)})")

    def __str__(self) -> str:
        return self.describe()


@dataclass
class ValidationReport:
    """Outcome of validating one day; ``success`` ignores warnings."""

    success: bool
    day: str
    n_rows: int
    errors: list[FailedCheck]
    warnings: list[FailedCheck]
    results_path: Path
    data_docs_dir: Path
    data_docs_index: Path
    notes: list[str] = field(default_factory=list)
    engine: str = "pandas"
    seconds: float = 0.0

    def summary(self) -> str:
        """A few lines for logs, exceptions and the CLI."""
        head = (
            f"validation of dt={self.day} {'passed' if self.success else 'FAILED'}: "
            f"{self.n_rows} rows, {len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        )
        lines = [head]
        lines += [f"  ERROR {c.describe()}" for c in self.errors]
        lines += [f"  warning {c.describe()}" for c in self.warnings]
        lines.append(f"  data docs: {self.data_docs_index}")
        return "\n".join(lines)


class ValidationFailed(RuntimeError):
    """Error-severity checks failed: the day's samples must not reach training."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        failed = "; ".join(c.describe() for c in report.errors)
        super().__init__(
            f"validation of dt={report.day} failed {len(report.errors)} error check(s): "
            f"{failed} (details: {report.data_docs_index})"
        )


def validate_or_raise(cfg: PipelineConfig, day: str, *, engine: str = "pandas"
                      ) -> ValidationReport:
    """Validate and raise :class:`ValidationFailed` on any error-severity failure."""
    report = validate_day(cfg, day, engine=engine)
    if not report.success:
        raise ValidationFailed(report)
    return report


def validate_day(cfg: PipelineConfig, day: str, *, engine: str = "pandas") -> ValidationReport:
    """Run the samples and manifest suites for ``day`` and store results and Data Docs."""
    started = time.perf_counter()
    _check_inputs(cfg, day, engine)
    manifest = read_manifest(cfg, day)
    suite, severities = build_suite(
        cfg, day, trailing_stats=load_trailing_stats(cfg, day), manifest=manifest,
        vocab=load_domain_vocab(cfg), engine=engine,
    )
    m_suite, m_severities = build_manifest_suite(cfg, day)
    samples, n_rows = _read_samples(cfg, day, engine)
    runs = [
        _SuiteRun(suite, severities, f"samples_{engine}", engine, samples),
        _SuiteRun(m_suite, m_severities, "manifest", "pandas",
                  manifest_frame(cfg, day, manifest)),
    ]
    results, docs_pages = _run_gx(cfg, day, runs)
    failed = _without_missing_column_noise([
        check for run in runs for check in _failed_checks(results[run.suite.name][1],
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
    _write_results(report, results, docs_pages)
    with _gx_lock(cfg):
        write_index(cfg)
    for check in report.warnings:
        log.warning("dt=%s validation warning %s", day, check.describe())
    return report


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


# --- GX context ----------------------------------------------------------------------


@contextmanager
def _gx_lock(cfg: PipelineConfig) -> Iterator[None]:
    """Serialize GX work across processes (backfills validate days in parallel).

    Suites, checkpoints and data sources have fixed names and are re-created per run, and
    the Data Docs index is shared; without the lock two days could clobber each other.
    """
    path = cfg.paths.lake_root / "gx" / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _open_context(cfg: PipelineConfig) -> Any:
    """File-mode context under <lake_root>/gx (created on first use), docs in reports."""
    root = cfg.paths.lake_root / "gx"
    root.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=root)
    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": str(_gx_site_dir(cfg)),
        },
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "show_cta_footer": False},
    }
    sites = context.get_config().data_docs_sites or {}
    changed = False
    for stale in [name for name in sites if name != SITE_NAME]:
        context.delete_data_docs_site(stale)
        changed = True
    if sites.get(SITE_NAME) != site:
        if SITE_NAME in sites:
            context.update_data_docs_site(SITE_NAME, site)
        else:
            context.add_data_docs_site(SITE_NAME, site)
        changed = True
    bars = context.variables.progress_bars  # a dict once read back from the yml
    if (bars.get("globally") if isinstance(bars, dict) else getattr(bars, "globally", True)):
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        changed = True
    if changed:
        context.variables.save()
    return context


def _gx_site_dir(cfg: PipelineConfig) -> Path:
    return data_docs_dir(cfg) / "gx"


def _forget_previous_run(context: Any, cfg: PipelineConfig, run_name: str) -> None:
    """Drop stored results and pages of earlier runs for the same day (idempotent reruns)."""
    store = context.validation_results_store
    for key in store.list_keys():
        if key.run_id.run_name == run_name:
            store.remove_key(key)
    for suite in (SAMPLES_SUITE, MANIFEST_SUITE):
        shutil.rmtree(_gx_site_dir(cfg) / "validations" / suite / run_name, ignore_errors=True)


@dataclass(frozen=True)
class _SuiteRun:
    """A suite, its severities and the batch (data source name, engine, frame) it checks."""

    suite: Any
    severities: Mapping[str, str]
    source: str
    engine: str
    data: Any


def _run_gx(cfg: PipelineConfig, day: str, runs: Sequence[_SuiteRun]
            ) -> tuple[dict[str, tuple[Any, Any]], dict[str, str]]:
    """Run every suite under one run id; results by suite name and their Data Docs pages."""
    with _gx_lock(cfg):
        context = _open_context(cfg)
        run_id = RunIdentifier(run_name=f"dt={day}", run_time=datetime.now(UTC))
        _forget_previous_run(context, cfg, run_id.run_name)
        results = {
            run.suite.name: _run_suite(context, run.suite, run.source, run.engine, run.data,
                                       run_id)
            for run in runs
        }
        return results, _docs_pages(context, cfg, results)


def _run_suite(
    context: Any, suite: Any, source: str, engine: str, data: Any, run_id: RunIdentifier
) -> tuple[Any, Any]:
    """Register suite, batch, validation definition and checkpoint afresh; run.

    Old objects of the same name are deleted first rather than add_or_update'd: updating
    a stored suite compares every expectation pairwise, seconds per run for ~100 of them.
    """
    for factory in (context.checkpoints, context.validation_definitions, context.suites):
        _delete_if_present(factory, suite.name)
    if engine == "spark":
        datasource = context.data_sources.add_or_update_spark(name=source)
    else:
        datasource = context.data_sources.add_or_update_pandas(name=source)
    batch_def = datasource.add_dataframe_asset(name="day").add_batch_definition_whole_dataframe(
        "whole"
    )
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=suite.name, data=batch_def, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=suite.name,
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=[SITE_NAME])],
            result_format="SUMMARY",
        )
    )
    outcome = checkpoint.run(batch_parameters={"dataframe": data}, run_id=run_id)
    ((identifier, result),) = outcome.run_results.items()
    return identifier, result


def _delete_if_present(factory: Any, name: str) -> None:
    try:
        factory.delete(name)
    except DataContextError:
        pass  # first run: nothing stored under that name yet


# --- results -------------------------------------------------------------------------


def _failed_checks(result: Any, severities: Mapping[str, str]) -> list[FailedCheck]:
    checks = []
    for r in result.results:
        if r.success:
            continue
        config = r.expectation_config
        kwargs = dict(config.kwargs)
        check = (config.meta or {}).get("check", config.type)
        column = kwargs.get("column") or (
            f"{kwargs['column_A']},{kwargs['column_B']}" if "column_A" in kwargs else None
        )
        checks.append(FailedCheck(
            name=config.type, column=column, observed=_observed(r),
            expected=_expected(kwargs), check=check, severity=severities.get(check, ERROR),
        ))
    return checks


def _without_missing_column_noise(checks: list[FailedCheck]) -> list[FailedCheck]:
    """Keep only the existence failure for a missing column, not every check that then
    raised on it: the summary should say "column X is missing" once."""
    missing = {c.column for c in checks if c.name == _EXISTS}
    return [c for c in checks if c.name == _EXISTS or c.column not in missing]


def _observed(r: Any) -> Any:
    """The observed value, unexpected-count summary or exception message of a result."""
    message = _exception_message(r.exception_info)
    if message:
        return f"exception: {message}"
    res = r.result or {}
    if r.expectation_config.type == _EXISTS:
        return "missing"
    if "observed_value" in res:
        return _jsonable(res["observed_value"])
    if "unexpected_count" in res:
        return {
            "unexpected_count": res["unexpected_count"],
            "element_count": res.get("element_count"),
            "examples": _jsonable(res.get("partial_unexpected_list", [])[:5]),
        }
    return None


def _exception_message(info: Any) -> str | None:
    if not isinstance(info, Mapping):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "").splitlines()[0][:300]
    for nested in info.values():  # keyed by metric id in some GX versions
        if isinstance(nested, Mapping) and nested.get("raised_exception"):
            return str(nested.get("exception_message") or "").splitlines()[0][:300]
    return None


def _expected(kwargs: Mapping[str, Any]) -> str:
    parts = []
    if "column_A" in kwargs:
        op = ">=" if kwargs.get("or_equal") else ">"
        parts.append(f"{kwargs['column_A']} {op} {kwargs['column_B']}")
    for key, value in kwargs.items():
        if key in _KWARGS_NOT_EXPECTED or key == "or_equal" or value is None:
            continue
        if isinstance(value, (list, tuple, set)) and len(value) > 8:
            value = f"{list(value)[:8]}... ({len(value)} values)"
        parts.append(f"{key}={value}")
    if kwargs.get("row_condition"):
        parts.append(f"where {_condition_text(kwargs['row_condition'])}")
    return ", ".join(parts)


def _condition_text(condition: Any) -> str:
    if isinstance(condition, Mapping):
        from great_expectations.expectations.row_conditions import deserialize_row_condition

        condition = deserialize_row_condition(dict(condition))
    return repr(condition)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    """numpy / pandas scalars as Python values, anything else as its string."""
    item = getattr(value, "item", None)
    return item() if callable(item) else str(value)


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, default=_json_default) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _docs_pages(context: Any, cfg: PipelineConfig, results: Mapping[str, tuple[Any, Any]]
                ) -> dict[str, str]:
    """Each suite's GX validation page, relative to the data docs directory."""
    pages = {}
    for suite, (identifier, _) in results.items():
        urls = context.get_docs_sites_urls(resource_identifier=identifier, site_name=SITE_NAME)
        if urls and urls[0].get("site_url"):
            target = Path(unquote(urlparse(urls[0]["site_url"]).path))
            pages[suite] = os.path.relpath(target, data_docs_dir(cfg))
    return pages


def _write_results(report: ValidationReport, results: Mapping[str, tuple[Any, Any]],
                   docs_pages: Mapping[str, str]) -> None:
    """results.json beside the partition: our verdict plus GX's full results."""
    payload = {
        "day": report.day,
        "success": report.success,
        "engine": report.engine,
        "n_rows": report.n_rows,
        "seconds": round(report.seconds, 3),
        "validated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "errors": [asdict(c) for c in report.errors],
        "warnings": [asdict(c) for c in report.warnings],
        "notes": report.notes,
        "docs_pages": dict(docs_pages),
        "gx_results": {name: result.to_json_dict() for name, (_, result) in results.items()},
    }
    path = report.results_path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=1, default=_json_default)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# --- CLI -----------------------------------------------------------------------------


def _iso_day(text: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD day: {text!r}") from exc


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
