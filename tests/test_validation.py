"""The GX samples guard on hand-built partitions: a clean day passes, each bad class trips
exactly its own error check, and the outputs (results.json, Data Docs, CLI) say so.

Partitions follow docs/contracts.md and are built deterministically: 4 conversion types x
3 display scenarios x 200 rows, click on every 4th row (CTR 0.25), conversion on every
40th (CVR among clicks 0.1). Trailing days are manifests with the same counts.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import PipelineConfig, load_config
from core.contracts import CLICK, CONVERSION, SCENARIO_ID, TYPE_ID
from core.vocab import Vocabulary, load_vocab, save_vocab, stage_vocab
from validation.baseline import TrailingStats, load_domain_vocab, trailing_days
from validation.runner import ValidationFailed, main, validate_day, validate_or_raise
from validation.suite import build_suite, samples_contract

DAY = "2024-01-08"
TYPES = ["app_install", "purchase", "signup", "lead"]
SCENARIOS = ["feed", "search", "splash"]
ROWS_PER_DOMAIN = 200
JUMP_TYPE = "purchase"


def make_cfg(tmp_path: Path, **overrides: Any) -> PipelineConfig:
    """The real pipeline.yaml with every path under tmp_path; environment ignored."""
    base = {
        "paths.raw_root": str(tmp_path / "raw"),
        "paths.lake_root": str(tmp_path / "lake"),
        "paths.truth_root": str(tmp_path / "truth"),
        "paths.reports_root": str(tmp_path / "reports"),
        "validation.drift_min_clicks": 100,  # per type 150, per scenario 200 clicks a day
    }
    return load_config(overrides={**base, **overrides}, environ={})


def make_rows(cfg: PipelineConfig, day: str, *, conversion_every: dict[str, int] | None = None
              ) -> list[dict[str, Any]]:
    """Contract rows for one day, sorted by (type_id, scenario_id, impression_id)."""
    every = conversion_every or {}
    id_field = cfg.logs["impressions"].id_field
    start = datetime.fromisoformat(day).replace(tzinfo=UTC)
    rows = []
    for t, type_value in enumerate(TYPES):
        for s, scenario in enumerate(SCENARIOS):
            for i in range(ROWS_PER_DOMAIN):
                click = int(i % 4 == 0)
                row = {
                    id_field: f"{day}-{type_value}-{scenario}-{i:04d}",
                    "ts": start + timedelta(seconds=i * 60 + t * 7 + s),
                    cfg.domains.type_field: type_value,
                    cfg.domains.scenario_field: scenario,
                    TYPE_ID: t,
                    SCENARIO_ID: s,
                    CLICK: click,
                    CONVERSION: int(click and i % every.get(type_value, 40) == 0),
                }
                for k, feature in enumerate(cfg.features):
                    row[feature.column] = (i * 7 + k * 13 + t) % feature.cardinality
                rows.append(row)
    return rows


def to_table(cfg: PipelineConfig, rows: list[dict[str, Any]]) -> pa.Table:
    types = {"string": pa.string(), "timestamp": pa.timestamp("us", tz="UTC"), "int32": pa.int32()}
    schema = pa.schema([(col, types[kind]) for col, kind in samples_contract(cfg).items()])
    return pa.Table.from_pylist(rows, schema=schema)


def manifest_for(cfg: PipelineConfig, day: str, rows: list[dict[str, Any]],
                 quarantine_share: float = 0.01) -> dict[str, Any]:
    """A contract manifest whose counts match the rows."""
    type_field, scenario_field = cfg.domains.type_field, cfg.domains.scenario_field
    per: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r[type_field], r[scenario_field])
        d = per.setdefault(key, {type_field: key[0], scenario_field: key[1],
                                 "type_id": r[TYPE_ID], "scenario_id": r[SCENARIO_ID],
                                 "samples": 0, "clicks": 0, "conversions": 0})
        d["samples"] += 1
        d["clicks"] += r[CLICK] or 0
        d["conversions"] += r[CONVERSION] or 0
    n = len(rows)
    return {
        "day": day, "built_at": "2024-01-09T00:00:00Z", "config_hash": cfg.config_hash(),
        "inputs": {"impressions": {"partitions": [], "records": n}},
        "used": {"impressions": n}, "quarantined": {}, "explained": {},
        "outputs": {"samples": n, "clicks": sum(d["clicks"] for d in per.values()),
                    "conversions": sum(d["conversions"] for d in per.values())},
        "per_domain": list(per.values()),
        "quarantine_share": quarantine_share,
    }


def write_manifest(cfg: PipelineConfig, day: str, manifest: dict[str, Any]) -> None:
    path = cfg.paths.manifest_path(day)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))


def write_day(cfg: PipelineConfig, day: str, rows: list[dict[str, Any]], *,
              trailing: bool = True, quarantine_share: float = 0.01) -> None:
    """Partition + manifest for ``day``, vocabularies, and clean trailing-day manifests."""
    out = cfg.paths.samples_dir(day)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(cfg, rows), out / "part-00000.parquet")
    write_manifest(cfg, day, manifest_for(cfg, day, rows, quarantine_share))
    save_vocab(cfg.paths.vocab_dir, Vocabulary(cfg.domains.type_field,
                                               {v: i for i, v in enumerate(TYPES)}))
    save_vocab(cfg.paths.vocab_dir, Vocabulary(cfg.domains.scenario_field,
                                               {v: i for i, v in enumerate(SCENARIOS)}))
    if trailing:
        for prior in trailing_days(day, cfg.validation.trailing_days):
            write_manifest(cfg, prior, manifest_for(cfg, prior, make_rows(cfg, prior)))


def checks(failed: list[Any]) -> set[str]:
    return {c.check for c in failed}


@pytest.fixture
def cfg(tmp_path: Path) -> PipelineConfig:
    return make_cfg(tmp_path)


# --------------------------------------------------------------------------- clean day


def test_clean_day_passes_every_check(cfg: PipelineConfig) -> None:
    write_day(cfg, DAY, make_rows(cfg, DAY))
    report = validate_or_raise(cfg, DAY)
    assert report.success and report.errors == [] and report.warnings == []
    assert report.n_rows == len(TYPES) * len(SCENARIOS) * ROWS_PER_DOMAIN
    stored = json.loads(report.results_path.read_text())
    assert report.results_path == cfg.paths.validation_dir(DAY) / "results.json"
    assert stored["success"] is True
    assert all(r["success"] for res in stored["gx_results"].values() for r in res["results"])
    assert report.data_docs_index.is_file()
    assert (report.data_docs_dir / "gx" / "index.html").is_file()


def test_suite_is_generated_from_config(tmp_path: Path) -> None:
    """A new feature field gets existence, type, null and range checks with no code change."""
    cfg0 = make_cfg(tmp_path)
    features = cfg0.raw["features"] + [{"name": "hour_of_day", "kind": "numeric",
                                          "boundaries": [6, 12, 18]}]
    cfg = make_cfg(tmp_path, features=features)
    write_day(cfg, DAY, make_rows(cfg, DAY))
    suite, severities = build_suite(cfg, DAY, trailing_stats=TrailingStats(), manifest=None,
                                    vocab=load_domain_vocab(cfg))
    for kind in ("exists", "type", "not_null", "min", "max"):
        assert severities[f"{kind}:feat_hour_of_day"] == "error"
    (upper,) = [e for e in suite.expectations if e.meta["check"] == "max:feat_hour_of_day"]
    assert upper.max_value == 4  # len(boundaries) + 2 ids: 0..4
    assert any("row-count, drift and domain-set checks skipped" in n for n in suite.notes)
    assert not any(c.startswith(("drift:", "jump:", "row_count:")) for c in severities)


def test_first_day_without_trailing_days_passes_with_a_note(cfg: PipelineConfig) -> None:
    write_day(cfg, DAY, make_rows(cfg, DAY), trailing=False)
    report = validate_day(cfg, DAY)
    assert report.success and report.warnings == []
    assert any("checks skipped" in n for n in report.notes)


# --------------------------------------------------------------------------- bad classes


def test_duplicate_impression_ids(cfg: PipelineConfig) -> None:
    rows = make_rows(cfg, DAY)
    id_field = cfg.logs["impressions"].id_field
    for k in (1, 2, 3):
        rows[k][id_field] = rows[0][id_field]
    write_day(cfg, DAY, rows)
    report = validate_day(cfg, DAY)
    assert checks(report.errors) == {f"unique:{id_field}"}
    (err,) = report.errors
    assert (err.name, err.column) == ("expect_column_values_to_be_unique", id_field)
    assert err.observed["unexpected_count"] == 4
    assert report.warnings == []


def test_conversion_without_click(cfg: PipelineConfig) -> None:
    rows = make_rows(cfg, DAY)
    assert rows[1][CLICK] == 0
    rows[1][CONVERSION] = 1
    write_day(cfg, DAY, rows)
    report = validate_day(cfg, DAY)
    assert checks(report.errors) == {"conversion_implies_click"}
    assert report.errors[0].name == "expect_column_pair_values_a_to_be_greater_than_b"
    assert report.errors[0].observed["unexpected_count"] == 1
    assert report.warnings == []


def test_out_of_range_hashed_id(cfg: PipelineConfig) -> None:
    feature = cfg.features[-1]
    rows = make_rows(cfg, DAY)
    rows[5][feature.column] = feature.cardinality
    write_day(cfg, DAY, rows)
    report = validate_day(cfg, DAY)
    assert checks(report.errors) == {f"max:{feature.column}"}
    (err,) = report.errors
    assert (err.name, err.column) == ("expect_column_max_to_be_between", feature.column)
    assert err.observed == feature.cardinality


def test_unknown_domain_id(cfg: PipelineConfig) -> None:
    rows = make_rows(cfg, DAY)
    for row in rows[:3]:
        row[TYPE_ID] = len(TYPES)  # one past the vocabulary
    write_day(cfg, DAY, rows)
    report = validate_day(cfg, DAY)
    assert checks(report.errors) == {f"vocab:{TYPE_ID}"}
    assert report.errors[0].column == TYPE_ID
    assert report.warnings == []


def test_null_ids(cfg: PipelineConfig) -> None:
    id_field = cfg.logs["impressions"].id_field
    rows = make_rows(cfg, DAY)
    rows[10][id_field] = None
    rows[11][TYPE_ID] = None
    rows[12][SCENARIO_ID] = None
    write_day(cfg, DAY, rows)
    report = validate_day(cfg, DAY)
    assert checks(report.errors) == {f"not_null:{c}" for c in (id_field, TYPE_ID, SCENARIO_ID)}
    assert {c.name for c in report.errors} == {"expect_column_values_to_not_be_null"}
    assert report.warnings == []


def test_day_with_a_third_of_rows_missing(tmp_path: Path) -> None:
    # The shipped tolerance (0.5) lets a one-third drop through; 0.25 catches it.
    cfg = make_cfg(tmp_path, **{"validation.row_count_tolerance": 0.25})
    rows = [r for k, r in enumerate(make_rows(cfg, DAY)) if k % 3 != 2]
    write_day(cfg, DAY, rows)
    report = validate_day(cfg, DAY)
    assert checks(report.errors) == {"row_count:trailing"}
    (err,) = report.errors
    assert (err.name, err.observed) == ("expect_table_row_count_to_be_between", len(rows))
    assert report.warnings == []


def test_domain_cvr_jumps_five_fold(cfg: PipelineConfig) -> None:
    rows = make_rows(cfg, DAY, conversion_every={JUMP_TYPE: 8})  # 0.1 -> 0.5
    write_day(cfg, DAY, rows)
    report = validate_day(cfg, DAY)
    name = f"cvr[{cfg.domains.type_field}={JUMP_TYPE}]"
    assert checks(report.errors) == {f"jump:{name}"}
    assert report.errors[0].name == "expect_column_mean_to_be_between"
    assert report.errors[0].observed == pytest.approx(0.5)
    # The same jump lifts overall and per-scenario CVR 2x: warnings, not errors.
    assert f"drift:{name}" in checks(report.warnings)
    assert "drift:cvr" in checks(report.warnings)


def test_missing_column_and_wrong_type(cfg: PipelineConfig) -> None:
    """Schema drift fails its exists / type checks without crashing the other checks."""
    dropped = cfg.features[0].column
    write_day(cfg, DAY, make_rows(cfg, DAY))
    part = cfg.paths.samples_dir(DAY) / "part-00000.parquet"
    table = pq.read_table(part).drop_columns([dropped])
    table = table.set_column(table.schema.get_field_index(CLICK), CLICK,
                             table.column(CLICK).cast(pa.int64()))
    pq.write_table(table, part)
    report = validate_day(cfg, DAY)
    assert checks(report.errors) == {f"exists:{dropped}", f"type:{CLICK}"}
    assert next(c for c in report.errors if c.check == f"type:{CLICK}").observed == "int64"


def test_missing_manifest_is_an_error(cfg: PipelineConfig) -> None:
    write_day(cfg, DAY, make_rows(cfg, DAY))
    cfg.paths.manifest_path(DAY).unlink()
    report = validate_day(cfg, DAY)
    assert "manifest:present" in checks(report.errors)
    assert checks(report.errors) <= {"manifest:present", "not_null:quarantine_share"}


def test_quarantine_share_above_limit(cfg: PipelineConfig) -> None:
    write_day(cfg, DAY, make_rows(cfg, DAY), quarantine_share=0.2)
    report = validate_day(cfg, DAY)
    assert checks(report.errors) == {"max:quarantine_share"}


def test_new_and_vanished_domains_are_warnings(cfg: PipelineConfig) -> None:
    rows = [r for r in make_rows(cfg, DAY)
            if (r[cfg.domains.type_field], r[cfg.domains.scenario_field]) != ("lead", "splash")]
    write_day(cfg, DAY, rows)
    report = validate_day(cfg, DAY)
    assert report.success
    scenario_field, type_field = cfg.domains.scenario_field, cfg.domains.type_field
    assert f"domains:{scenario_field}[{type_field}=lead]" in checks(report.warnings)


# --------------------------------------------------------------------------- outputs


def test_failure_reaches_data_docs_exception_and_cli(cfg: PipelineConfig, capsys) -> None:
    rows = make_rows(cfg, DAY)
    id_field = cfg.logs["impressions"].id_field
    rows[1][id_field] = rows[0][id_field]
    write_day(cfg, DAY, rows)
    with pytest.raises(ValidationFailed) as caught:
        validate_or_raise(cfg, DAY)
    message = str(caught.value)
    assert "expect_column_values_to_be_unique" in message and id_field in message
    report = caught.value.report
    index = report.data_docs_index.read_text()
    assert f"unique:{id_field}" in index and "expect_column_values_to_be_unique" in index
    stored = json.loads(report.results_path.read_text())
    gx_page = report.data_docs_dir / stored["docs_pages"]["samples"]
    assert gx_page.is_file() and "unique" in gx_page.read_text()

    argv = ["--day", DAY, "--set", f"paths.lake_root={cfg.paths.lake_root}",
            "--set", f"paths.reports_root={cfg.paths.reports_root}",
            "--set", "validation.drift_min_clicks=100"]
    assert main(argv) == 1
    assert f"unique:{id_field}" in capsys.readouterr().err
    # Rerunning the same day replaces its results instead of piling them up.
    gx_results = cfg.paths.lake_root / "gx" / "gx" / "uncommitted" / "validations"
    stored_runs = [p for p in gx_results.rglob("*.json") if f"dt={DAY}" in str(p)]
    assert len(stored_runs) == 2  # one samples + one manifest result
    assert index.count(f"id='dt={DAY}'") == 1


def test_cli_help() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0


# --------------------------------------------------------------------------- vocabulary


def _stage(cfg: PipelineConfig, day: str, types: list[str]) -> None:
    stage_vocab(cfg.paths.vocab_dir, day, Vocabulary(cfg.domains.type_field, {v: i for i, v in enumerate(types)}))


def _day_with_types(cfg: PipelineConfig, day: str, extra_types: list[str]) -> None:
    """A day whose samples also hold one row per extra type, ids after the committed ones."""
    rows = make_rows(cfg, day)
    for k, value in enumerate(extra_types):
        row = dict(rows[0])
        row.update({cfg.logs["impressions"].id_field: f"{day}-extra-{k}", cfg.domains.type_field: value,
                    TYPE_ID: len(TYPES) + k})
        rows.append(row)
    out = cfg.paths.samples_dir(day)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(cfg, rows), out / "part-00000.parquet")
    write_manifest(cfg, day, manifest_for(cfg, day, rows))
    _stage(cfg, day, TYPES + extra_types)


def test_junk_day_fails_on_capacity_and_never_reaches_the_training_vocabulary(tmp_path: Path) -> None:
    """Issue 17 item 2: the junk day's values are staged with its build, the day fails
    validation naming them, and the vocabulary training reads never sees them; the next
    good day validates and commits its own new value only."""
    cfg = make_cfg(tmp_path, **{"domains.max_types": 6})
    write_day(cfg, DAY, make_rows(cfg, DAY), trailing=False)  # commits TYPES
    junk_day, good_day = "2024-01-09", "2024-01-10"
    junk = [f"junk_{k:02d}" for k in range(3)]
    _day_with_types(cfg, junk_day, junk)
    report = validate_day(cfg, junk_day)
    assert not report.success
    (err,) = [c for c in report.errors if c.check == f"capacity:{cfg.domains.type_field}"]
    assert all(value in err.describe() for value in junk) and "capacity 6" in err.describe()
    with pytest.raises(ValidationFailed, match="junk_02"):
        validate_or_raise(cfg, junk_day)
    assert load_vocab(cfg.paths.vocab_dir, cfg.domains.type_field).values() == TYPES  # training unaffected

    _day_with_types(cfg, good_day, ["video_view"])
    assert validate_day(cfg, good_day).success
    assert load_vocab(cfg.paths.vocab_dir, cfg.domains.type_field).values() == [*TYPES, "video_view"]


def test_day_built_on_an_older_vocabulary_than_committed_is_an_error(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    write_day(cfg, DAY, make_rows(cfg, DAY), trailing=False)
    first, second = "2024-01-09", "2024-01-10"
    _day_with_types(cfg, first, ["video_view"])
    _day_with_types(cfg, second, ["add_to_cart"])  # built before `first` was committed: same id
    assert validate_day(cfg, first).success
    report = validate_day(cfg, second)
    assert f"vocab_base:{cfg.domains.type_field}" in checks(report.errors)
    assert load_vocab(cfg.paths.vocab_dir, cfg.domains.type_field).values() == [*TYPES, "video_view"]
