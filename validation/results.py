"""What a validation run found and how it is reported: failed checks read out of GX's
results (one line each, naming the check, the column, what was seen and what was expected),
the day's report and its exception, and ``results.json`` beside the partition.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from validation.suite import ERROR

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
        return (f"{self.check}: {self.name}{target} observed {_short(self.observed, 600)}"
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


def failed_checks(result: Any, severities: Mapping[str, str]) -> list[FailedCheck]:
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


def without_missing_column_noise(checks: list[FailedCheck]) -> list[FailedCheck]:
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



def write_results(report: ValidationReport, results: Mapping[str, tuple[Any, Any]],
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
