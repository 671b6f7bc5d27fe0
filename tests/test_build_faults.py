"""The Spark build on one tiny hand-written day holding the bad-record and bad-file classes
of issue 17 (items 5, 6, 7 and the build's half of item 2): conflicting duplicates, event
times outside the partition's day, non-strict JSON, files the job does not read and a
corrupt gzip file. Each class must land under its own reason in the manifest and the
quarantine table, and the rest of the day must build.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from core.config import PipelineConfig, load_config
from core.vocab import Vocabulary, load_day_vocab, load_vocab, save_vocab, staged_vocab_dir
from tests.spark_fixtures import spark  # noqa: F401

pytest.importorskip("pyspark")

from spark_jobs.build_samples import build_day  # noqa: E402
from spark_jobs.reasons import CorruptInputError  # noqa: E402

DAY, NEXT = "2026-11-10", "2026-11-11"
GOOD = 12
COMMITTED_TYPES = ["purchase", "signup"]


def make_cfg(root: Path, **extra: object) -> PipelineConfig:
    return load_config(overrides={
        "paths.raw_root": str(root / "raw"), "paths.lake_root": str(root / "lake"),
        "paths.truth_root": str(root / "truth"), "spark.shuffle_partitions": 2,
        "spark.output_files_per_day": 1, "spark.max_lost_bytes_share": 0.5, **extra,
    }, environ={})


def imp(i: str, ts: str, *, ad: str = "a1", ctype: str = "purchase") -> dict:
    return {"impression_id": i, "ts": ts, "user_id": f"u{i}", "ad_id": ad, "conversion_type": ctype,
            "display_scenario": "feed", "advertiser_id": "adv1", "device_os": "ios", "user_age": 30,
            "bid_price": 0.4}


def line(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))


def write_raw(cfg: PipelineConfig) -> dict[str, str]:
    """Day DAY's partitions; returns the ids of the records each test looks at."""
    imps_dir = cfg.paths.raw_dir("impressions", DAY)
    clicks_dir = cfg.paths.raw_dir("clicks", DAY)
    for d in (imps_dir, clicks_dir):
        d.mkdir(parents=True)
    good = [imp(f"g{k:02d}", f"{DAY}T10:{k:02d}:00Z") for k in range(GOOD)]
    good.append(imp("new-type", f"{DAY}T11:00:00Z", ctype="brand_new_goal"))
    lines = [line(r) for r in good]
    # item 5: an exact copy (spelled differently), and an id with two different contents
    lines.append(json.dumps(dict(reversed(list(good[0].items())))))
    lines.append(line(imp("conflict", f"{DAY}T15:00:00Z", ad="real-ad")))
    lines.append(line(imp("conflict", f"{DAY}T00:00:00Z", ad="fake-ad")))
    # item 6: event times outside the day; one just inside the tolerance
    lines.append(line(imp("y2099", "2099-11-10T10:00:00Z")))
    lines.append(line(imp("month-early", "2026-10-10T10:00:00Z")))
    lines.append(line(imp("late-flush", "2026-11-09T23:30:00Z")))
    # item 6: strict JSON
    lines.append(line(imp("garbage1", f"{DAY}T12:00:00Z")) + " trailing")
    lines.append(line(imp("garbage2", f"{DAY}T12:00:00Z")) + '{"impression_id":"x"}')
    lines.append(line(imp("garbage3", f"{DAY}T12:00:00Z")) + "}")
    lines.append(line(imp("nan", f"{DAY}T12:00:00Z")).replace('"bid_price":0.4', '"bid_price":NaN'))
    lines.append(line(imp("inf", f"{DAY}T12:00:00Z")).replace('"user_age":30', '"user_age":Infinity'))
    (imps_dir / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    # item 7: files that are not read, and a truncated gzip file
    for name in ("extra.txt", "UPPER.JSONL", "part-00000"):
        (imps_dir / name).write_text(line(imp(f"unread-{name}", f"{DAY}T10:00:00Z")) + "\n")
    (imps_dir / "_SUCCESS").write_text("")
    whole = gzip.compress("".join(line(imp(f"gz{k}", f"{DAY}T09:00:00Z")) + "\n" for k in range(40)).encode())
    (imps_dir / "part-1.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    clicks = [{"click_id": "c-good", "impression_id": "g01", "ts": f"{DAY}T10:01:30Z"},
              {"click_id": "c-conflict", "impression_id": "conflict", "ts": f"{DAY}T15:00:30Z"},
              {"click_id": "c-2099", "impression_id": "g02", "ts": "2099-11-10T10:02:30Z"}]
    (clicks_dir / "part-0.jsonl").write_text("".join(line(c) + "\n" for c in clicks))
    return {"corrupt": str(imps_dir / "part-1.jsonl.gz")}


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):  # noqa: F811
    cfg = make_cfg(tmp_path_factory.mktemp("faults"))
    paths = write_raw(cfg)
    save_vocab(cfg.paths.vocab_dir, Vocabulary(cfg.domains.type_field,
                                               {v: i for i, v in enumerate(COMMITTED_TYPES)}))
    manifest = build_day(spark, cfg, DAY)
    quarantine = pq.read_table(cfg.paths.quarantine_dir(DAY)).to_pylist()
    samples = pq.read_table(cfg.paths.samples_dir(DAY)).to_pylist()
    return SimpleNamespace(cfg=cfg, manifest=manifest, quarantine=quarantine, samples=samples, **paths)


def quarantined(built, log: str, reason: str) -> list[str]:
    """Ids of the quarantined records of ``log`` under ``reason`` (their raw lines are JSON)."""
    id_field = built.cfg.logs[log].id_field
    return sorted(json.loads(r["raw"])[id_field] for r in built.quarantine if r["log"] == log and r["reason"] == reason)


def test_exact_duplicates_are_explained_conflicting_ones_quarantined(built) -> None:
    m = built.manifest
    assert m["explained"]["impressions"] == {"duplicate": 1}
    assert m["quarantined"]["impressions"]["conflicting_duplicate"] == 2
    assert [r["impression_id"] for r in built.samples].count("g00") == 1
    assert "conflict" not in {r["impression_id"] for r in built.samples}
    raws = [r["raw"] for r in built.quarantine if r["reason"] == "conflicting_duplicate"]
    assert sorted(json.loads(r)["ad_id"] for r in raws) == ["fake-ad", "real-ad"]  # every copy
    assert m["explained"]["clicks"].get("impression_quarantined") == 1  # its click joins no features


def test_event_time_outside_the_partition_day_is_quarantined(built) -> None:
    m = built.manifest
    assert m["quarantined"]["impressions"]["event_time_out_of_range"] == 2
    assert quarantined(built, "impressions", "event_time_out_of_range") == ["month-early", "y2099"]
    assert "late-flush" in {r["impression_id"] for r in built.samples}  # inside the tolerance
    assert m["quarantined"]["clicks"] == {"event_time_out_of_range": 1}
    assert m["used"]["clicks"] == 1


def test_json_is_strict(built) -> None:
    malformed = [r["raw"] for r in built.quarantine if r["reason"] == "malformed_json"]
    assert built.manifest["quarantined"]["impressions"]["malformed_json"] == 5
    assert {r.split('"impression_id":"')[1].split('"')[0] for r in malformed} == {
        "garbage1", "garbage2", "garbage3", "nan", "inf"}
    assert not {"garbage1", "nan", "inf"} & {r["impression_id"] for r in built.samples}


def test_every_file_is_read_or_listed_with_a_reason(built) -> None:
    files = built.manifest["files"]["impressions"]
    part = f"impressions/dt={DAY}"
    assert files["read"] == [f"{part}/part-0.jsonl"]
    skipped = {Path(s["file"]).name: s["reason"] for s in files["skipped"]}
    assert set(skipped) == {"extra.txt", "UPPER.JSONL", "part-00000", "_SUCCESS"}
    assert all(skipped[n].startswith("not a data file name") for n in ("extra.txt", "UPPER.JSONL", "part-00000"))
    (corrupt,) = files["corrupt"]
    assert corrupt["file"] == f"{part}/part-1.jsonl.gz" and corrupt["bytes"] > 0
    assert "EOFError" in corrupt["error"] or "compressed file ended" in corrupt["error"]
    assert 0 < files["lost_bytes_share"] < 0.5
    assert built.manifest["outputs"]["samples"] == len(built.samples) == GOOD + 2  # + new-type, late-flush
    assert not {r["impression_id"] for r in built.samples} & {"unread-extra.txt", "gz0"}


def test_too_many_lost_bytes_fail_the_day_naming_the_files(built) -> None:
    cfg = make_cfg(Path(built.cfg.paths.lake_root).parent, **{"spark.max_lost_bytes_share": 0.01,
                                                               "paths.lake_root": str(built.cfg.paths.lake_root) + "2"})
    with pytest.raises(CorruptInputError, match="part-1.jsonl.gz") as caught:
        build_day(None, cfg, DAY)  # fails before any Spark work
    assert "max_lost_bytes_share=0.01" in str(caught.value)
    assert not cfg.paths.samples_dir(DAY).exists()


def test_vocabulary_growth_is_staged_not_committed(built) -> None:
    cfg = built.cfg
    assert load_vocab(cfg.paths.vocab_dir, cfg.domains.type_field).values() == COMMITTED_TYPES
    staged = load_day_vocab(cfg.paths.vocab_dir, DAY, cfg.domains.type_field)
    assert staged.values() == [*COMMITTED_TYPES, "brand_new_goal"]
    assert (staged_vocab_dir(cfg.paths.vocab_dir, DAY) / f"{cfg.domains.type_field}.json").is_file()
    (row,) = [r for r in built.samples if r["impression_id"] == "new-type"]
    assert row["type_id"] == 2
