"""Dates of the daily DAG: which run builds which impression day.

A run's data interval is the previous day (CronDataIntervalTimetable); it builds the
interval's start day minus the label delay. These helpers invert that mapping for the
demo (``dag.test``) and for backfills of chosen impression days.
"""

from __future__ import annotations

import datetime as dt

from core.config import PipelineConfig


def parse_day(day: str) -> dt.date:
    """The one ISO-date parser for day arguments (CLI, DAG params, task functions): a clear
    error naming the bad value instead of fromisoformat's generic one."""
    try:
        return dt.date.fromisoformat(day)
    except (TypeError, ValueError):
        raise ValueError(f"day {day!r} is not an ISO date (YYYY-MM-DD)") from None


def cron_time(cron: str) -> tuple[int, int]:
    """(hour, minute) of a daily cron expression with a fixed time."""
    minute, hour, *_ = cron.split()
    if not (minute.isdigit() and hour.isdigit()):
        raise ValueError(f"the daily DAG needs a cron with fixed minute and hour, got {cron!r}")
    return int(hour), int(minute)


def interval_start_for(cfg: PipelineConfig, day: str) -> dt.datetime:
    """Logical date (data interval start) of the run that builds impression day ``day``."""
    hour, minute = cron_time(cfg.airflow.schedule)
    start = parse_day(day) + dt.timedelta(days=cfg.windows.label_delay_days)
    return dt.datetime(start.year, start.month, start.day, hour, minute, tzinfo=dt.UTC)


def logical_date_for(cfg: PipelineConfig, day: str) -> dt.datetime:
    """The ``dag.test`` date of the run that builds ``day``.

    ``dag.test(logical_date=X)`` infers the data interval that *ends* at X, so X is one
    day after the interval's start.
    """
    return interval_start_for(cfg, day) + dt.timedelta(days=1)


def day_built_by(cfg: PipelineConfig, interval_start: dt.datetime) -> str:
    """The impression day a scheduled run builds: its interval's day minus the label delay."""
    return (interval_start.date() - dt.timedelta(days=cfg.windows.label_delay_days)).isoformat()
