"""Great Expectations guard for the daily samples partition (errors stop training)."""

from validation.results import FailedCheck, ValidationFailed, ValidationReport
from validation.runner import main, validate_day, validate_or_raise
from validation.suite import build_manifest_suite, build_suite

__all__ = [
    "FailedCheck",
    "ValidationFailed",
    "ValidationReport",
    "build_manifest_suite",
    "build_suite",
    "main",
    "validate_day",
    "validate_or_raise",
]
