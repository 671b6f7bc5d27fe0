"""The build job's trailing-garbage check (a byte search spares most lines its regex) and its
repeated-impression-id aggregation against their plain definitions, on rows chosen to hit
their edges.
"""

from __future__ import annotations

import pytest

from tests.spark_fixtures import spark  # noqa: F401

pytest.importorskip("pyspark")

from pyspark.sql import functions as F  # noqa: E402

from spark_jobs.impressions import repeated_impression_ids  # noqa: E402
from spark_jobs.parse import trailing_garbage  # noqa: E402

LINES = [
    '{"a":1}',                      # flat: the only "}" is the last character
    '{"a":1}  \t',                  # trailing blanks
    '{"a":{"b":1}}',                # nested object at the end: "}}" but valid
    '{"a":{"b":1},"c":2}',          # nested, not at the end
    '{"a":"}"}',                    # a brace inside a string
    '{"a":"} {"}',                  # a string holding "} {"
    '{"a":1}{"b":2}',               # two objects glued
    '{"a":1} {"b":2}',              # two objects, a blank between
    '{"a":1}}',                     # a stray closing brace
    '{"a":1} x',                    # text after the object
    '{"a":1',                       # unterminated
    "",
    "}",
    "{}",
]


def test_trailing_garbage_equals_the_regex_alone(spark) -> None:  # noqa: F811
    df = spark.createDataFrame([(s,) for s in LINES], "value string")
    text = F.rtrim(F.translate(F.col("value"), "\t\r\n", "   "))
    ends_in_brace = F.substring(text, -1, 1) == "}"
    wrapped = F.from_json(F.concat(F.lit("["), text, F.lit(',"#end-of-record"]')), "array<variant>")
    sentinel_ok = (F.size(wrapped) == 2) & (F.element_at(wrapped, 2).cast("string") == "#end-of-record")
    plain = ~ends_in_brace | (text.rlike(r"\}\s*[{}]") & ~F.coalesce(sentinel_ok, F.lit(False)))
    rows = df.select("value", trailing_garbage(F.col("value")).alias("fast"), plain.alias("plain")).collect()
    assert [(r["value"], r["fast"]) for r in rows] == [(r["value"], r["plain"]) for r in rows]
    garbage = {r["value"] for r in rows if r["fast"]}
    assert {'{"a":1}{"b":2}', '{"a":1} {"b":2}', '{"a":1}}', '{"a":1} x'} <= garbage
    assert not garbage & {'{"a":1}', '{"a":{"b":1}}', '{"a":"}"}', '{"a":{"b":1},"c":2}'}


def test_repeated_ids_equal_a_plain_group_by(spark) -> None:  # noqa: F811
    rows = [("a", None, 1), ("a", None, 1), ("b", None, 1), ("b", None, 2), ("c", None, 3),
            ("d", "wrong_type", 4), ("d", None, 4), ("e", "wrong_type", 5), ("e", "bad_timestamp", 5),
            ("f", None, 6), ("f", None, 6), ("f", None, 7)]
    imps = spark.createDataFrame(rows, "id string, reason string, fields_hash long")
    got = {(r["id"], r["conflicting"]) for r in repeated_impression_ids(imps).collect()}
    valid = imps.filter(F.col("reason").isNull())
    plain = (valid.groupBy("id").agg(F.count(F.lit(1)).alias("n"),
                                     (F.min("fields_hash") != F.max("fields_hash")).alias("conflicting"))
             .filter("n > 1").collect())
    assert got == {(r["id"], r["conflicting"]) for r in plain} == {("a", False), ("b", True), ("f", True)}
