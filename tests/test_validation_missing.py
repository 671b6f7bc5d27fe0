"""Issue 17, item 4: validation sees a missing feature. A missing value hashes to id 0, which
passes the not-null and range checks, so each feature's share of id 0 is checked against an
absolute ceiling (validation.max_missing_share) and against its share on the trailing days
(+ validation.missing_share_increase), both errors. Hand-built partitions as in
tests/test_validation.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.config import PipelineConfig
from tests.test_validation import DAY, checks, make_cfg, make_rows, manifest_for, write_day, write_manifest
from validation.baseline import trailing_days
from validation.runner import validate_day


def _missing(cfg: PipelineConfig, rows: list[dict[str, Any]]) -> dict[str, int]:
    return {f.column: sum(1 for r in rows if r[f.column] == 0) for f in cfg.features}


def _with_trailing_missing(cfg: PipelineConfig, day: str) -> None:
    """Trailing manifests that record each feature's missing count, as the build writes them."""
    for prior in trailing_days(day, cfg.validation.trailing_days):
        rows = make_rows(cfg, prior)
        write_manifest(cfg, prior, {**manifest_for(cfg, prior, rows), "missing": _missing(cfg, rows)})


def _blank(rows: list[dict[str, Any]], column: str, every: int) -> list[dict[str, Any]]:
    for k, row in enumerate(rows):
        if k % every == 0:
            row[column] = 0
    return rows


def test_a_feature_absent_on_every_row_is_an_error(tmp_path: Path) -> None:
    """advertiser_id absent and bid_price null on every row: today's code passes this day."""
    cfg = make_cfg(tmp_path)
    rows = make_rows(cfg, DAY)
    for row in rows:
        row["feat_advertiser_id"] = row["feat_bid_price"] = 0
    write_day(cfg, DAY, rows)
    _with_trailing_missing(cfg, DAY)
    report = validate_day(cfg, DAY)
    assert not report.success
    assert checks(report.errors) == {f"{kind}:{c}" for kind in ("missing", "missing_drift")
                                     for c in ("feat_advertiser_id", "feat_bid_price")}
    (err,) = [c for c in report.errors if c.check == "missing:feat_advertiser_id"]
    assert err.observed["unexpected_count"] == len(rows)


def test_ceiling_holds_without_trailing_days(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, **{"validation.max_missing_share": 0.3})
    write_day(cfg, DAY, _blank(make_rows(cfg, DAY), "feat_ad_id", 2), trailing=False)  # ~50% missing
    report = validate_day(cfg, DAY)
    assert checks(report.errors) == {"missing:feat_ad_id"}


def test_missing_share_drift_against_trailing_days(tmp_path: Path) -> None:
    """Under the ceiling but far above the trailing share: an error; a small rise is not."""
    cfg = make_cfg(tmp_path)
    base = _missing(cfg, make_rows(cfg, DAY))["feat_ad_id"] / len(make_rows(cfg, DAY))
    write_day(cfg, DAY, _blank(make_rows(cfg, DAY), "feat_ad_id", 3))  # ~+33 points, under 0.5
    _with_trailing_missing(cfg, DAY)
    report = validate_day(cfg, DAY)
    assert base < 0.01
    assert checks(report.errors) == {"missing_drift:feat_ad_id"}

    write_day(cfg, DAY, _blank(make_rows(cfg, DAY), "feat_ad_id", 20))  # +5 points: fine
    _with_trailing_missing(cfg, DAY)
    assert validate_day(cfg, DAY).success
