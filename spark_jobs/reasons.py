"""The build job's vocabulary of outcomes: the three logs, the reason codes a record is
quarantined or explained with, and its errors. The manifest and the quarantine table carry
these strings (docs/contracts.md), so they are named once, here.
"""

from __future__ import annotations

LOGS = ("impressions", "clicks", "conversions")

# Reason codes, quarantined: the record breaks the raw-log contract.
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_required_field"
WRONG_TYPE = "wrong_type"
BAD_TIMESTAMP = "bad_timestamp"
UNKNOWN_DOMAIN = "unknown_domain_value"
EVENT_TIME_OUT_OF_RANGE = "event_time_out_of_range"  # ts outside its partition's day (+/- tolerance)
CONFLICTING_DUPLICATE = "conflicting_duplicate"  # same impression id, different content: every copy
ORPHAN_CLICK = "orphan_click"
ORPHAN_CONVERSION = "orphan_conversion"
CLICK_BEFORE_IMPRESSION = "click_before_impression"
CONVERSION_BEFORE_CLICK = "conversion_before_click"
QUARANTINE_REASONS = (INVALID_UTF8, MALFORMED_JSON, MISSING_FIELD, WRONG_TYPE, BAD_TIMESTAMP, UNKNOWN_DOMAIN,
                      EVENT_TIME_OUT_OF_RANGE, CONFLICTING_DUPLICATE, ORPHAN_CLICK, ORPHAN_CONVERSION, CLICK_BEFORE_IMPRESSION, CONVERSION_BEFORE_CLICK)

# Reason codes, explained: a valid record that doesn't count for day D, and why.
DUPLICATE = "duplicate"  # same id and content seen before: one copy is kept
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


class MissingInputError(SystemExit):
    """Day D has no impressions to build: a clear message instead of a Spark stack trace."""


class CorruptInputError(SystemExit):
    """Too large a share of a log's bytes sits in unreadable files: the day is not built, and
    the message names every such file with its error (not a Java stack trace)."""


class AccountingError(RuntimeError):
    """records != used + quarantined + explained for a log: a bug, never written out."""
