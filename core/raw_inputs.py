"""Which raw-log files a day's build reads, and the check that they are there.

Shared by the Spark job and the DAG's cheap pre-check, so a missing day fails in seconds
with a message naming the folder, before a JVM starts. No Spark import here.
"""

from __future__ import annotations

from pathlib import Path

from core.config import PipelineConfig

TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


class MissingRawLogsError(FileNotFoundError):
    """Day D has no impressions to build."""


def data_files(directory: Path) -> tuple[list[str], list[str]]:
    """JSON-lines and Parquet data files of one partition (hidden and marker files skipped)."""
    if not directory.is_dir():
        return [], []
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    text = [str(p) for p in files if p.name.endswith(TEXT_SUFFIXES)]
    parquet = [str(p) for p in files if p.name.endswith(".parquet")]
    return text, parquet


def require_impressions(cfg: PipelineConfig, day: str) -> list[str]:
    """The day's non-empty impression files; raises MissingRawLogsError when there are none."""
    directory = cfg.paths.raw_dir("impressions", day)
    text, parquet = data_files(directory)
    present = [p for p in text + parquet if Path(p).stat().st_size > 0]
    if not present:
        raise MissingRawLogsError(f"build {day}: no impressions to build: {directory} is missing or has no "
                                  "non-empty *.jsonl[.gz] / *.parquet file")
    return present
