"""Which run builds which impression day: the mapping the demo and `mmn backfill` rely on."""

from __future__ import annotations

import datetime as dt

import pytest

from core.config import load_config
from core.schedule import day_built_by, interval_start_for, logical_date_for
from mmn.backfill import describe, range_for_days


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides=["windows.label_delay_days=3", "airflow.schedule=0 6 * * *"])


def test_interval_start_and_day_built_are_inverse(cfg):
    start = interval_start_for(cfg, "2026-11-01")
    assert start == dt.datetime(2026, 11, 4, 6, 0, tzinfo=dt.UTC)
    assert day_built_by(cfg, start) == "2026-11-01"
    assert logical_date_for(cfg, "2026-11-01") == start + dt.timedelta(days=1)  # dag.test's date


def test_backfill_range_for_days_selects_exactly_those_days(cfg):
    first, last = range_for_days(cfg, "2026-11-01", "2026-11-03")
    lines = describe(cfg, first, last)
    assert [line.split()[-1] for line in lines] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    with pytest.raises(ValueError, match="before"):
        range_for_days(cfg, "2026-11-03", "2026-11-01")


def test_a_bare_to_date_is_midnight_so_that_days_run_is_excluded(cfg):
    # Airflow reads --to-date 2026-11-06 as midnight: the 06:00 run of that day is not in range.
    lines = describe(cfg, "2026-11-04", "2026-11-06")
    assert [line.split()[-1] for line in lines] == ["2026-11-01", "2026-11-02"]
