"""The Spark job's feature ids must equal core.hashing's bit for bit: serving hashes raw
requests in Python with the ids the model was trained on, which Spark computed."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest

from core.config import FeatureField, load_config
from core.hashing import categorical_id, hash_record, numeric_id
from tests.spark_fixtures import spark  # noqa: F401

pytest.importorskip("pyspark")
from pyspark.sql import functions as F  # noqa: E402
from pyspark.sql import types as T  # noqa: E402

from spark_jobs.impressions import categorical_id_expr, feature_id_expr, numeric_id_expr  # noqa: E402
from spark_jobs.parse import parse_records, value_column  # noqa: E402
from spark_jobs.sources import log_fields  # noqa: E402

ALPHABETS = [
    (0x20, 0x7E),  # ASCII, including = " \ and space
    (0xA0, 0x17F),  # Latin-1 supplement, Latin Extended-A
    (0x300, 0x36F),  # combining marks
    (0x590, 0x6FF),  # Hebrew, Arabic (RTL)
    (0x4E00, 0x4FFF),  # CJK
    (0xAC00, 0xACFF),  # Hangul
    (0x1F300, 0x1F6FF),  # emoji (astral plane: surrogate pairs in JSON)
]
SPECIAL_STRINGS = [
    "", " ", "  ", "\t", "\n", "\x00", "=", "==", "a=b", '"', "\\", "null", "None", "NaN", "nan", "inf",
    "0", "-0", "00", "1", "-1", "123", "1e10", "1.0", "0.1", "3.14159", "9223372036854775807", "True",
    "purchase", "PURCHASE", "café", "cafe\u0301", "😀", "👩\u200d💻", "🇩🇪", "\ufeffbom", "\u200b", "ﬁ", "Ω", "Ω",
]


def _random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ALPHABETS)
        out.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12))))
    return out


def _numbers(boundaries: tuple[float, ...], seed: int) -> list[float | None]:
    rng = random.Random(seed)
    values: list[float | None] = [None, math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, -5e-324,
                                  sys.float_info.max, -sys.float_info.max, 1e-300]
    for b in boundaries:
        values += [b, math.nextafter(b, math.inf), math.nextafter(b, -math.inf), b + 0.5, b - 0.5, -b]
    values += [rng.uniform(-10, 2 * boundaries[-1]) for _ in range(2000)]
    values += [float(rng.randint(0, 100)) for _ in range(300)]
    return values


def _categorical_fields() -> list[FeatureField]:
    cfg = load_config()
    fields = [f for f in cfg.features if f.kind == "categorical"]
    return fields + [FeatureField("tiny", "categorical", buckets=2), FeatureField("odd", "categorical", buckets=7),
                     FeatureField("big", "categorical", buckets=1 << 24)]


def _numeric_fields() -> list[FeatureField]:
    cfg = load_config()
    fields = [f for f in cfg.features if f.kind == "numeric"]
    return fields + [FeatureField("neg", "numeric", boundaries=(-1.5, 0.0, 1e-9, 7.0))]


def test_categorical_ids_match_python(spark) -> None:  # noqa: F811
    values: list[str | None] = [None, *SPECIAL_STRINGS, *_random_strings(3000, seed=11)]
    fields = _categorical_fields()
    df = spark.createDataFrame([(v,) for v in values], T.StructType([T.StructField("v", T.StringType())]))
    rows = df.select("v", *[categorical_id_expr(f, F.col("v")).alias(f.name) for f in fields]).collect()
    assert len(rows) == len(values)
    mismatches = [(f.name, r["v"], r[f.name], categorical_id(f, r["v"]))
                  for r in rows for f in fields if r[f.name] != categorical_id(f, r["v"])]
    assert not mismatches, mismatches[:10]
    assert {r["tiny"] for r in rows if r["v"]} == {1}  # buckets=2: one id besides "missing"


def test_numeric_ids_match_python(spark) -> None:  # noqa: F811
    for field in _numeric_fields():
        values = _numbers(field.boundaries, seed=5)
        df = spark.createDataFrame([(v,) for v in values], T.StructType([T.StructField("x", T.DoubleType())]))
        rows = df.select("x", numeric_id_expr(field, F.col("x")).alias("id")).collect()
        got = [r["id"] for r in rows]
        want = [numeric_id(field, v) for v in values]
        bad = [(v, g, w) for v, g, w in zip(values, got, want, strict=True) if g != w]
        assert not bad, (field.name, bad[:10])
        assert got[1] == 0 and got[0] == 0  # NaN and null are "missing", although Spark sorts NaN highest


def test_ids_through_the_json_parser_match_python(spark, tmp_path) -> None:  # noqa: F811
    """Whole path: JSON text (escaped and raw UTF-8) -> the job's parser -> ids, versus
    json.loads -> core.hashing.hash_record."""
    cfg = load_config()
    fields = log_fields(cfg, "impressions")
    strings = [*SPECIAL_STRINGS, *_random_strings(1500, seed=3)]
    numbers = [v for v in _numbers((18, 25, 35, 45, 55, 65, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0), seed=9)
               if v is None or math.isfinite(v)]
    rng = random.Random(1)
    lines = []
    for i in range(2000):
        rec = {name: rng.choice(strings) for name, kind in fields.kinds.items() if kind == "string"}
        rec.update({cfg.logs["impressions"].id_field: f"imp-{i}", "ts": "2026-11-01T10:00:00.000Z",
                    cfg.domains.type_field: "purchase", cfg.domains.scenario_field: "banner"})
        for f in cfg.features:
            if f.kind == "numeric":
                rec[f.name] = rng.choice(numbers)
            elif f.name not in fields.required and rng.random() < 0.1:
                rec.pop(f.name, None)  # an absent optional field is "missing"
        for name in ("user_id", "ad_id"):
            if rec.get(name) == "":
                rec[name] = "x"  # required ids must be non-empty to be valid
        lines.append(json.dumps(rec, ensure_ascii=bool(i % 2)))
    lines.append('{"impression_id":"imp-big","ts":"2026-11-01T10:00:00Z","user_id":"u","ad_id":"a",'
                 '"conversion_type":"purchase","display_scenario":"banner","user_age":1e400,"bid_price":-1e400}')
    path = tmp_path / "impressions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    raw = spark.read.text(str(path)).select("value", F.lit(str(path)).alias("source_file"),
                                            F.lit("2026-11-01").alias("part_day"))
    parsed = parse_records(raw, fields, cfg.domains.value_pattern)
    hashed = parsed.select("id", "reason", *[feature_id_expr(f, F.col(value_column(f.name))).alias(f.column)
                                             for f in cfg.features]).collect()
    expected = {}
    for line in lines:
        rec = json.loads(line)
        expected[rec["impression_id"]] = hash_record(cfg.features, rec)
    assert len(hashed) == len(lines)
    invalid = [(r["id"], r["reason"]) for r in hashed if r["reason"] is not None]
    assert not invalid, invalid[:5]
    bad = [(r["id"], [r[c] for c in cfg.feature_columns], expected[r["id"]]) for r in hashed
           if [r[c] for c in cfg.feature_columns] != expected[r["id"]]]
    assert not bad, bad[:5]
