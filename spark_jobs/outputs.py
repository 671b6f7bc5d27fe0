"""The day's outputs and how they land: the samples and quarantine frames, written to a
staging directory beside the target and swapped in whole, so a reader never sees a mix and
a rerun of a day replaces it exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from core.config import PipelineConfig
from core.contracts import CLICK, CONVERSION, DOMAIN_COLUMNS, TS, feature_columns, sample_id_column
from spark_jobs.reasons import CONFLICTING_DUPLICATE, QUARANTINED


def samples_frame(cfg: PipelineConfig, unique_imps: DataFrame, labels: DataFrame) -> DataFrame:
    """The contract's samples columns, in order: labels broadcast-joined onto the impressions."""
    imp_id = sample_id_column(cfg)
    joined = unique_imps.join(F.broadcast(labels), imp_id, "left")
    return joined.select(
        imp_id, TS, cfg.domains.type_field, cfg.domains.scenario_field, *DOMAIN_COLUMNS,
        *feature_columns(cfg),
        *[F.coalesce(F.col(label), F.lit(0)).cast("int").alias(label) for label in (CLICK, CONVERSION)],
    )


def quarantine_frame(imps: DataFrame, click_status: DataFrame, conv_status: DataFrame,
                     conflicting: DataFrame) -> DataFrame:
    """log, reason, raw (made valid UTF-8 so any reader can open it), source_file.

    ``conflicting`` holds the raw lines of conflicting duplicate impressions: ``imps`` keeps
    raw text only for records that failed parsing, so their rows come from there."""
    def rows(df: DataFrame, log: str, cond: Column) -> DataFrame:
        return df.filter(cond).select(F.lit(log).alias("log"), "reason",
                                      F.make_valid_utf8("value").alias("raw"), "source_file")

    return (rows(imps, "impressions", F.col("reason").isNotNull() & (F.col("reason") != CONFLICTING_DUPLICATE))
            .unionByName(rows(conflicting, "impressions", F.lit(True)))
            .unionByName(rows(click_status, "clicks", F.col("status") == QUARANTINED))
            .unionByName(rows(conv_status, "conversions", F.col("status") == QUARANTINED)))


def _staging_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.staging-{uuid.uuid4().hex[:12]}"


def _drop_markers(directory: Path) -> None:
    for p in directory.iterdir():
        if p.name.startswith((".", "_")):
            p.unlink()


def write_staged(df: DataFrame, target: Path) -> Path:
    """Write a complete copy next to ``target``; :func:`swap_in` makes it current."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(target)
    df.write.mode("overwrite").parquet(str(staging))
    _drop_markers(staging)
    return staging


def swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` with two renames, so a reader never sees a mix."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def staging_leftovers(cfg: PipelineConfig, day: str) -> list[Path]:
    """Staging directories a failed or killed build of ``day`` left beside its targets."""
    found = []
    for target in (cfg.paths.samples_dir(day), cfg.paths.quarantine_dir(day)):
        if target.parent.is_dir():
            found += list(target.parent.glob(f".{target.name}.staging-*"))
    return found
