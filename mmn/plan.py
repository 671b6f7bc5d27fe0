"""Which day a run builds and which days train it (the window and the holdout rule)."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from core.config import PipelineConfig
from core.schedule import parse_day

log = logging.getLogger(__name__)

__all__ = ["TrainingPlan", "check_raw_logs", "is_built", "parse_day", "resolve_day", "training_plan"]


def resolve_day(cfg: PipelineConfig, explicit: str | None, interval_start: dt.datetime | None) -> str:
    """The impression day a run builds: an explicit date, else the data interval's day
    minus the label delay (that day's conversions have had time to arrive)."""
    if explicit:
        return parse_day(explicit).isoformat()
    if interval_start is None:
        raise ValueError("no date given and the run has no data interval")
    from core.schedule import day_built_by

    return day_built_by(cfg, interval_start)


def check_raw_logs(cfg: PipelineConfig, day: str) -> int:
    """Fail in seconds, naming the folder, when day D has no impressions (before Spark starts)."""
    from core.raw_inputs import require_impressions

    files = require_impressions(cfg, day)
    log.info("raw impressions of %s: %d file(s) under %s", day, len(files), cfg.paths.raw_dir("impressions", day))
    return len(files)


def is_built(cfg: PipelineConfig, day: str) -> bool:
    samples = cfg.paths.samples_dir(day)
    return samples.is_dir() and any(samples.glob("*.parquet"))


@dataclass(frozen=True)
class TrainingPlan:
    """Which days train the model and which rows are held out (holdout rule: latest day)."""

    day: str
    train_days: list[str]
    missing_days: list[str]
    cold_start: bool

    @property
    def description(self) -> str:
        if self.cold_start:
            return f"cold start: {self.day} split by impression_id hash"
        return f"{self.train_days[0]}..{self.train_days[-1]} ({len(self.train_days)} days)"


def training_plan(cfg: PipelineConfig, day: str, window_days: int | None = None) -> TrainingPlan:
    k = window_days or cfg.windows.train_window_days
    d = parse_day(day)
    window = [(d - dt.timedelta(days=i)).isoformat() for i in range(k, 0, -1)]
    built = [w for w in window if is_built(cfg, w)]
    missing = [w for w in window if w not in built]
    if not built:
        return TrainingPlan(day, [day], missing, cold_start=True)
    return TrainingPlan(day, built, missing, cold_start=False)
