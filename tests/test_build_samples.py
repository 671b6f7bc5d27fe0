"""The Spark build job on tiny generated days.

Labels and feature ids are checked row by row against a pure-Python reference built from
the raw files; reruns must reproduce a day exactly; a new domain value must not move any
existing id; a fault-injected day must be fully accounted for, each defect under its reason.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from core.config import PipelineConfig, load_config
from core.hashing import hash_record
from core.vocab import commit_staged_vocab, load_day_vocab, load_vocab
from tests.spark_fixtures import spark  # noqa: F401

pytest.importorskip("pyspark")

from core.raw_inputs import data_files  # noqa: E402
from simulation.generate_logs import generate  # noqa: E402
from spark_jobs.build_samples import build_day  # noqa: E402
from spark_jobs.build_samples import main as build_main  # noqa: E402
from spark_jobs.reasons import MissingInputError  # noqa: E402
from spark_jobs.sources import partition_spans, shift  # noqa: E402

D1, D2 = "2026-11-01", "2026-11-02"
N1, N2 = 3000, 6000
FAULT_RATE = 0.05
NEW_TYPE = "brand_new_goal"
LOGS = ("impressions", "clicks", "conversions")
PARSE_REASONS = {"invalid_utf8", "malformed_json", "missing_required_field", "wrong_type", "bad_timestamp"}


def make_cfg(root: Path, **extra: object) -> PipelineConfig:
    return load_config(overrides={
        "paths.raw_root": str(root / "raw"), "paths.lake_root": str(root / "lake"),
        "paths.truth_root": str(root / "truth"), "spark.shuffle_partitions": 2,
        "spark.output_files_per_day": 2, **extra,
    })


def read_samples(cfg: PipelineConfig, day: str) -> pa.Table:
    """All files of the day in name order (the order the contract promises to be sorted in)."""
    files = sorted(cfg.paths.samples_dir(day).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def add_converting_impression_with_new_type(cfg: PipelineConfig, day: str) -> str:
    """One more impression, as Parquet files: a new conversion type, clicked and converted."""
    imp_id, click_id = f"imp-extra-{day}", f"clk-extra-{day}"
    shown = dt.datetime.fromisoformat(f"{day}T12:00:00+00:00")
    impression = {cfg.logs["impressions"].id_field: imp_id, "ts": shown, "user_id": "u1", "ad_id": "a1",
                  cfg.domains.type_field: NEW_TYPE, cfg.domains.scenario_field: "scenario_03",
                  "device_os": "ios", "user_age": 30.0, "bid_price": 0.3}
    click = {cfg.logs["clicks"].id_field: click_id, cfg.logs["impressions"].id_field: imp_id,
             "ts": shown + dt.timedelta(minutes=5)}
    conversion = {cfg.logs["conversions"].id_field: f"cnv-extra-{day}", cfg.logs["clicks"].id_field: click_id,
                  "ts": shown + dt.timedelta(hours=2)}
    for log, record in (("impressions", impression), ("clicks", click), ("conversions", conversion)):
        pq.write_table(pa.Table.from_pylist([record]), cfg.paths.raw_dir(log, day) / "part-extra.parquet")
    return imp_id


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):  # noqa: F811
    """D1: clean JSON lines. D2: gzip JSON lines with every defect class at 5%, plus one
    impression (new conversion type) with its click and conversion as Parquet files.
    Build D1, D2, then D1 again. D1's build reads D2's partitions for its late events, so
    it also sees D2's defects: they must be explained there, never quarantined twice."""
    cfg = make_cfg(tmp_path_factory.mktemp("lake"))
    counts1 = generate(cfg, D1, 1, impressions_per_day=N1, preset="criteo")
    counts2 = generate(cfg, D2, 1, impressions_per_day=N2, preset="criteo", fault_rate=FAULT_RATE, fmt="jsonl.gz")
    extra_id = add_converting_impression_with_new_type(cfg, D2)
    first = build_day(spark, cfg, D1)
    samples1 = read_samples(cfg, D1)
    commit_staged_vocab(cfg.paths.vocab_dir, D1)  # what D1's passing validation does
    types_after_d1 = dict(load_vocab(cfg.paths.vocab_dir, cfg.domains.type_field).ids)
    second = build_day(spark, cfg, D2)
    rerun = build_day(spark, cfg, D1)
    return SimpleNamespace(cfg=cfg, counts1=counts1, counts2=counts2, extra_id=extra_id, first=first,
                           samples1=samples1, types_after_d1=types_after_d1, second=second, rerun=rerun,
                           samples1_rerun=read_samples(cfg, D1), samples2=read_samples(cfg, D2),
                           quarantine2=pq.read_table(cfg.paths.quarantine_dir(D2)))


# ---------------------------------------------------------------- pure-Python reference


def _ts(value: object) -> dt.datetime:
    return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))


def raw_records(cfg: PipelineConfig, log: str, day: str) -> list[dict]:
    """Records that parse, with string ids and a readable ts (defects of other days' logs
    never belong to the day under test, so the reference may skip them)."""
    text, parquet = data_files(cfg.paths.raw_dir(log, day))
    out: list[dict] = []
    for path in text:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as fh:
            for line in fh:
                try:
                    out.append(json.loads(line.decode("utf-8")))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue
    for path in parquet:
        out += pq.read_table(path).to_pylist()
    required = cfg.logs[log].required
    return [r for r in out if isinstance(r, dict) and all(
        _readable_ts(r.get(k)) if kind == "timestamp" else isinstance(r.get(k), str) for k, kind in required.items())]


def _readable_ts(value: object) -> bool:
    try:
        return isinstance(value, str | dt.datetime) and _ts(value).tzinfo is not None
    except ValueError:
        return False


def reference_labels(cfg: PipelineConfig, day: str) -> dict[str, tuple[int, int]]:
    """Labels as the README defines them, computed without Spark."""
    imp_id, click_id = cfg.logs["impressions"].id_field, cfg.logs["clicks"].id_field
    imps = {r[imp_id]: _ts(r["ts"]) for r in raw_records(cfg, "impressions", day)}
    click_days, conv_days = partition_spans(cfg)
    window = dt.timedelta(minutes=cfg.windows.click_window_minutes)
    first_click: dict[str, tuple[dt.datetime, str]] = {}
    for offset in range(click_days + 1):
        for c in raw_records(cfg, "clicks", shift(day, offset)):
            shown = imps.get(c.get(imp_id))
            if shown is not None and dt.timedelta(0) <= _ts(c["ts"]) - shown <= window:
                first_click[c[imp_id]] = min(first_click.get(c[imp_id], (dt.datetime.max.replace(tzinfo=dt.UTC), "")),
                                             (_ts(c["ts"]), c[click_id]))
    counted = {cid: (imp, ts) for imp, (ts, cid) in first_click.items()}
    attribution = dt.timedelta(hours=cfg.windows.attribution_window_hours)
    converted = set()
    for offset in range(conv_days + 1):
        for v in raw_records(cfg, "conversions", shift(day, offset)):
            hit = counted.get(v.get(click_id))
            if hit is not None and dt.timedelta(0) <= _ts(v["ts"]) - hit[1] <= attribution:
                converted.add(hit[0])
    return {i: (int(i in first_click), int(i in converted)) for i in imps}


def assert_matches_reference(cfg: PipelineConfig, day: str, samples: pa.Table) -> None:
    labels = reference_labels(cfg, day)
    records = {r[cfg.logs["impressions"].id_field]: r for r in raw_records(cfg, "impressions", day)}
    types = load_day_vocab(cfg.paths.vocab_dir, day, cfg.domains.type_field)
    scenarios = load_day_vocab(cfg.paths.vocab_dir, day, cfg.domains.scenario_field)
    rows = samples.to_pylist()
    assert {r["impression_id"] for r in rows} == set(records)
    for row in rows:
        raw = records[row["impression_id"]]
        assert (row["click"], row["conversion"]) == labels[row["impression_id"]], row["impression_id"]
        assert [row[c] for c in cfg.feature_columns] == hash_record(cfg.features, raw)
        assert row["type_id"] == types.id_of(raw[cfg.domains.type_field])
        assert row["scenario_id"] == scenarios.id_of(raw[cfg.domains.scenario_field])
        assert row["ts"] == _ts(raw["ts"])


# ---------------------------------------------------------------- the clean day


def test_schema_rows_and_order(lake) -> None:
    cfg = lake.cfg
    expected = [("impression_id", pa.string()), ("ts", pa.timestamp("us", tz="UTC")),
                ("conversion_type", pa.string()), ("display_scenario", pa.string()),
                ("type_id", pa.int32()), ("scenario_id", pa.int32()),
                *[(c, pa.int32()) for c in cfg.feature_columns], ("click", pa.int32()), ("conversion", pa.int32())]
    for s in (lake.samples1, lake.samples2):
        assert [(f.name, f.type) for f in s.schema] == expected
        keys = list(zip(*(s.column(k).to_pylist() for k in ("type_id", "scenario_id", "impression_id")),
                        strict=True))
        assert keys == sorted(keys)
    assert lake.samples1.num_rows == lake.counts1["impressions"][D1] == N1
    assert len(list(cfg.paths.samples_dir(D1).glob("part-*.parquet"))) == cfg.spark.output_files_per_day


def test_labels_and_features_match_python_reference(lake) -> None:
    assert_matches_reference(lake.cfg, D1, lake.samples1_rerun)


def test_clean_day_accounts_for_everything(lake) -> None:
    m, s = lake.first, lake.samples1
    click, conv = s.column("click"), s.column("conversion")
    assert pc.all(pc.less_equal(conv, click)).as_py()  # a conversion implies a click
    assert 0 < pc.sum(conv).as_py() < pc.sum(click).as_py()
    assert m["outputs"] == {"samples": s.num_rows, "clicks": pc.sum(click).as_py(),
                            "conversions": pc.sum(conv).as_py()}
    for log in LOGS:
        q, e = m["quarantined"][log], m["explained"][log]
        assert m["inputs"][log]["records"] == m["used"][log] + sum(q.values()) + sum(e.values())
        assert not q, q  # D2's defects sit in partitions D1 reads: explained here, not quarantined
    assert m["explained"]["clicks"].get("other_partition", 0) > 0
    assert m["inputs"]["conversions"]["partitions"][0] == D1
    assert sum(d["samples"] for d in m["per_domain"]) == s.num_rows and m["quarantine_share"] == 0.0
    assert m["missing"] == {c: pc.sum(pc.equal(s.column(c), 0).cast(pa.int64())).as_py() or 0
                            for c in lake.cfg.feature_columns}
    assert m["missing"]["feat_user_age"] > 0  # the generator leaves some ages unknown
    on_disk = json.loads(lake.cfg.paths.manifest_path(D1).read_text())
    assert list(on_disk) == ["day", "built_at", "config_hash", "inputs", "used", "quarantined", "explained",
                             "outputs", "per_domain", "missing", "quarantine_share", "files"]
    own = [f for f in on_disk["files"]["impressions"]["read"] if f.startswith(f"impressions/dt={D1}/")]
    assert own == [f"impressions/dt={D1}/part-00000.jsonl"]
    assert all(not f["corrupt"] and not f["skipped"] for f in on_disk["files"].values())


def test_truth_file_covers_every_impression(lake) -> None:
    truth = pq.read_table(lake.cfg.paths.truth_file(D1))
    assert truth.column_names == ["impression_id", "p_click", "p_conversion"]
    assert set(truth.column("impression_id").to_pylist()) == set(lake.samples1.column("impression_id").to_pylist())
    assert 0 < pc.min(truth.column("p_click")).as_py() and pc.max(truth.column("p_conversion")).as_py() < 1


def test_rerun_reproduces_the_day_exactly(lake) -> None:
    assert lake.samples1_rerun.equals(lake.samples1)
    assert {k: v for k, v in lake.rerun.items() if k != "built_at"} == \
           {k: v for k, v in lake.first.items() if k != "built_at"}
    assert not [p.name for p in lake.cfg.paths.samples_root.iterdir() if p.name.startswith(".")]


def test_vocabulary_ids_stable_when_a_new_value_appears(lake) -> None:
    cfg = lake.cfg
    types = load_day_vocab(cfg.paths.vocab_dir, D2, cfg.domains.type_field).ids
    before = lake.types_after_d1
    assert {k: types[k] for k in before} == before  # no existing id moved
    assert types[NEW_TYPE] == len(before)  # the new value got the next id
    # D2 is not validated: its new value is staged for D2 only, not in what training reads
    assert load_vocab(cfg.paths.vocab_dir, cfg.domains.type_field).ids == before
    rows = [r for r in lake.samples2.to_pylist() if r["conversion_type"] == NEW_TYPE]
    assert [(r["impression_id"], r["type_id"]) for r in rows] == [(lake.extra_id, len(before))]


# ---------------------------------------------------------------- the fault-injected day


def test_fault_day_fully_accounted_for(lake) -> None:
    m = lake.second
    for log in LOGS:
        q, e = m["quarantined"][log], m["explained"][log]
        assert m["inputs"][log]["records"] == m["used"][log] + sum(q.values()) + sum(e.values()), log
    assert m["inputs"]["impressions"]["records"] == lake.counts2["impressions"][D2] + 1
    assert m["used"]["impressions"] == lake.samples2.num_rows
    assert m["quarantine_share"] > 0


def test_each_fault_class_is_quarantined_under_its_reason(lake) -> None:
    q, e = lake.second["quarantined"], lake.second["explained"]
    per_class = 300  # ceil(0.05 * 6000) impressions per injected class
    assert q["impressions"] == {**{r: per_class for r in PARSE_REASONS}, "unknown_domain_value": 2 * per_class}
    assert e["impressions"] == {"duplicate": per_class}
    assert set(q["clicks"]) >= PARSE_REASONS | {"orphan_click"}
    assert set(q["conversions"]) >= PARSE_REASONS | {"orphan_conversion", "conversion_before_click"}
    assert e["clicks"]["duplicate"] > 0 and e["conversions"]["duplicate"] > 0


def test_quarantine_file_matches_manifest(lake) -> None:
    table = lake.quarantine2
    assert table.column_names == ["log", "reason", "raw", "source_file"]
    counted: dict[str, dict[str, int]] = {log: {} for log in LOGS}
    for row in table.group_by(["log", "reason"]).aggregate([("raw", "count")]).to_pylist():
        counted[row["log"]][row["reason"]] = row["raw_count"]
    assert counted == lake.second["quarantined"]
    rows = table.to_pylist()
    assert all(r["source_file"].endswith(".jsonl.gz") for r in rows)
    assert all("\ufffd" in r["raw"] for r in rows if r["reason"] == "invalid_utf8")
    malformed = [r["raw"] for r in rows if r["reason"] == "malformed_json"]
    assert malformed and not any(_is_object(m) for m in malformed)


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def test_fault_day_labels_consistent_and_parquet_read(lake) -> None:
    s = lake.samples2
    assert pc.all(pc.less_equal(s.column("conversion"), s.column("click"))).as_py()
    extra = [r for r in s.to_pylist() if r["impression_id"] == lake.extra_id]
    assert [(r["click"], r["conversion"]) for r in extra] == [(1, 1)]  # labels joined across Parquet files


# ---------------------------------------------------------------- errors and environment


def test_missing_day_is_a_clear_error(spark, tmp_path) -> None:  # noqa: F811
    cfg = make_cfg(tmp_path)
    with pytest.raises(MissingInputError, match="no impressions to build"):
        build_day(spark, cfg, "2030-01-01")
    empty = cfg.paths.raw_dir("impressions", "2030-01-02")
    empty.mkdir(parents=True)
    (empty / "part-00000.jsonl").write_text("")
    with pytest.raises(SystemExit, match="missing or has no non-empty"):
        build_main(["--day", "2030-01-02", f"--set=paths.raw_root={cfg.paths.raw_root}"])
    (empty / "part-00000.jsonl").write_text("\n\n")
    with pytest.raises(MissingInputError, match="hold no records"):
        build_day(spark, cfg, "2030-01-02")


def test_set_overrides_reach_the_spark_job(tmp_path, monkeypatch) -> None:
    """Issue 17 item 8: spark-submit got only --config, so `mmn build --set paths.lake_root=X`
    built into the old lake. The job's arguments now carry the effective config."""
    import re

    from core.config import ConfigError
    from mmn.build import BUILD_JOB, spark_submit_command
    from spark_jobs.build_samples import build_parser, job_config

    cfg = load_config(overrides=[f"paths.lake_root={tmp_path / 'lake'}", f"paths.raw_root={tmp_path / 'raw'}",
                                 "spark.output_files_per_day=1"])
    command = spark_submit_command(cfg, "2030-01-02")
    job_args = command[command.index(str(BUILD_JOB)) + 1:]
    job_cfg = job_config(build_parser().parse_args(job_args))
    assert job_cfg.paths.lake_root == tmp_path / "lake" and job_cfg.spark.output_files_per_day == 1
    assert job_cfg.config_hash() == cfg.config_hash()
    with monkeypatch.context() as patched:  # the job's environment overrides a key the submitter did not
        patched.setenv("MMN__TRAINING__EPOCHS", str(cfg.training.epochs + 1))
        with pytest.raises(ConfigError, match="not the submitter's"):
            job_config(build_parser().parse_args(job_args))
    # The entry point itself reads the overridden raw root (it fails before starting a JVM).
    with pytest.raises(SystemExit, match=re.escape(str(tmp_path / "raw"))):
        build_main(job_args)


def test_python_udf_runs(spark) -> None:  # noqa: F811
    """pyspark-client overwriting pyspark's Python files breaks exactly this."""
    from pyspark.sql import functions as F

    plus_one = F.udf(lambda x: x + 1, "long")
    assert [r[0] for r in spark.range(4).select(plus_one("id")).collect()] == [1, 2, 3, 4]
