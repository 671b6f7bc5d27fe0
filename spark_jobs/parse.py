"""Parsing raw records against the raw-log contract, each defect with its own reason code.

A typed ``from_json`` fast path, and an exact variant-typed check only for the rows where a
value's JSON type is in doubt (Spark's parser silently turns a number given for a string
field into text), so the cost of exactness is paid by few rows.

JSON is strict: Spark's parser accepts bare ``NaN`` / ``Infinity`` and ignores anything after
the first complete object, so non-numeric numbers are switched off and a line must end with
the object's closing brace; the few lines that might hide a second object or brace after it
are parsed once more inside a sentinel array (:func:`trailing_garbage`). An event time outside
its partition's day (plus a tolerance) is a defect of the record too.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_jobs.reasons import (
    BAD_TIMESTAMP,
    EVENT_TIME_OUT_OF_RANGE,
    INVALID_UTF8,
    MALFORMED_JSON,
    MISSING_FIELD,
    UNKNOWN_DOMAIN,
    WRONG_TYPE,
)
from spark_jobs.sources import LogFields

CORRUPT = "_corrupt_record"
ISO_TS = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$"
NUMERIC_VARIANT = r"^(TINYINT|SMALLINT|INT|BIGINT|FLOAT|DOUBLE|DECIMAL\(.*\))$"
LINE_BREAKS = "[\\n\\r\\u0085\\u2028\\u2029]"
END_SENTINEL = "#end-of-record"
DAY_US = 86_400_000_000


def trailing_garbage(value: Column) -> Column:
    """True when text follows the record's JSON object (``{..} x``, ``{..}{..}``, ``{..}}``).

    Spark's JSON parser stops after the first complete value, so the check is done here.
    Cheap for almost every line: it must end with ``}``. Only lines where a ``}`` is followed
    by another brace (a nested object at the end, or a glued second object) are parsed again
    as ``[<line>,"#end-of-record"]``: that array has two elements exactly when nothing but
    the one object came before the sentinel."""
    text = F.rtrim(F.translate(value, "\t\r\n", "   "))
    ends_in_brace = F.substring(text, -1, 1) == "}"
    # The pattern needs a "}" before the last character: a byte search rules most lines out
    # before the regex scans them (a flat record's only "}" is its last character).
    in_doubt = (F.instr(text, "}") < F.length(text)) & text.rlike(r"\}\s*[{}]")
    wrapped = F.from_json(F.concat(F.lit("["), text, F.lit(f',"{END_SENTINEL}"]')), T.ArrayType(T.VariantType()))
    sentinel_ok = (F.size(wrapped) == 2) & (F.element_at(wrapped, 2).cast("string") == END_SENTINEL)
    return ~ends_in_brace | (in_doubt & ~F.coalesce(sentinel_ok, F.lit(False)))


def outside_partition_day(ts: Column, part_day: Column, tolerance_us: int) -> Column:
    """The event time lies outside [part_day 00:00 - tolerance, next day 00:00 + tolerance)."""
    start = F.unix_micros(F.to_timestamp(part_day))
    micros = F.unix_micros(ts)
    return (micros < start - F.lit(tolerance_us)) | (micros >= start + F.lit(DAY_US + tolerance_us))


def value_column(name: str) -> str:
    return f"v__{name}"


def looks_like_json_literal(text: Column, is_iso_timestamp: Column | None = None) -> Column:
    """Could this text be Spark's rendering of a non-string JSON value (number, true/false,
    object, array)? A cheap first-character test; a valid ISO timestamp never is one."""
    first = F.ascii(text)
    maybe = (first.between(48, 57) | first.isin(45, 91, 123)  # 0-9 - [ {
             | (text == "true") | (text == "false"))
    return maybe if is_iso_timestamp is None else ~is_iso_timestamp & maybe


def parse_records(raw: DataFrame, fields: LogFields, value_pattern: str, *,
                  tolerance_minutes: float | None = None) -> DataFrame:
    """Typed columns plus ``reason`` (null when the record keeps the contract).

    ``tolerance_minutes`` (None: no check) bounds how far outside its partition's day
    (``part_day``) a record's event time may lie before it is quarantined as
    ``event_time_out_of_range``: a record of 2099 in ``dt=2026-11-10`` is a defect.

    Fast path: one typed ``from_json``. Spark's parser turns a number or object given for a
    string field into text silently, so rows where a text field looks like a JSON literal
    (and rows the typed parse flags as corrupt) take an exact path: the line is parsed again
    with variant fields and every field's JSON type is checked. Columns out: ``id``, ``ref``
    (foreign key), ``ts``, ``v__<field>`` per other field, ``reason``, ``value``,
    ``source_file``, ``part_day``, ``content_hash`` (a deterministic tie-break)."""
    names = list(fields.kinds)
    is_text = [fields.kinds[n] != "number" for n in names]
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT, "allowNonNumericNumbers": "false"}
    typed_schema = T.StructType([T.StructField(n, T.StringType() if text else T.DoubleType())
                                 for n, text in zip(names, is_text, strict=True)]
                                + [T.StructField(CORRUPT, T.StringType())])
    variant_schema = T.StructType([T.StructField(n, T.VariantType()) for n in names])
    keep = ["value", "source_file", "part_day"]

    parsed = raw.select(*keep, F.from_json("value", typed_schema, options).alias("_j"))
    timestamps = [i for i, n in enumerate(names) if fields.kinds[n] == "timestamp"]
    parsed = parsed.select(*keep, F.col("_j")[CORRUPT].alias("_corrupt"),
                           *[F.col("_j")[n].alias(f"_v{i}") for i, n in enumerate(names)])
    # The ISO pattern is the costliest per-row test: evaluated once, used twice.
    parsed = parsed.select("*", *[F.col(f"_v{i}").rlike(ISO_TS).alias(f"_iso{i}") for i in timestamps])
    iso = {i: F.col(f"_iso{i}") for i in timestamps}
    # A corrupt record is broken JSON unless it is an object (then a value failed its type).
    parsed = parsed.withColumn("_cobj", F.col("_corrupt").isNotNull() & F.json_object_keys("value").isNotNull())
    literal_text = [F.coalesce(looks_like_json_literal(F.col(f"_v{i}"), iso.get(i)), F.lit(False))
                    for i in range(len(names)) if is_text[i]]
    parsed = parsed.withColumn("_exact", reduce(lambda a, b: a | b, literal_text, F.col("_cobj")))

    flags: list[Column] = []
    for i, name in enumerate(names):
        # Inside CASE WHEN _exact only: the variant parse runs for exact-path rows alone.
        x = F.from_json("value", variant_schema)[name]
        vtype = F.schema_of_variant(x)
        exact_ok = (vtype == "STRING") if is_text[i] else vtype.rlike(NUMERIC_VARIANT)
        exact_absent = x.isNull() | (vtype == "VOID")
        absent = F.when(F.col("_exact"), exact_absent).otherwise(F.col(f"_v{i}").isNull())
        wrong = F.when(F.col("_exact"), ~exact_absent & ~F.coalesce(exact_ok, F.lit(False))).otherwise(False)
        flags += [absent.alias(f"_a{i}"), wrong.alias(f"_w{i}")]
    checked = parsed.select(*keep, "_corrupt", "_cobj", *[f"_v{i}" for i in range(len(names))],
                            *iso.values(), *flags, trailing_garbage(F.col("value")).alias("_tail"))

    missing: list[Column] = []
    bad_ts: list[Column] = []
    out_of_range: list[Column] = []
    bad_domain: list[Column] = []
    outputs: list[Column] = []
    for i, name in enumerate(names):
        kind, value = fields.kinds[name], F.col(f"_v{i}")
        valid_type = ~F.col(f"_a{i}") & ~F.col(f"_w{i}")
        if kind == "timestamp":
            parsed_ts = F.when(iso[i], value.try_cast("timestamp"))
            bad_ts.append(valid_type & parsed_ts.isNull())
            if tolerance_minutes is not None:
                out_of_range.append(outside_partition_day(parsed_ts, F.col("part_day"),
                                                          int(tolerance_minutes * 60_000_000)))
            value = parsed_ts
        if name in fields.required:
            empty = (value == "") if kind == "string" and name not in fields.domain_fields else F.lit(False)
            missing.append(F.col(f"_a{i}") | F.coalesce(empty, F.lit(False)))
        if name in fields.domain_fields:
            bad_domain.append(value.isNull() | ~value.rlike(value_pattern) | value.rlike(LINE_BREAKS))
        outputs.append(value.alias(value_column(name)))

    def any_of(conditions: list[Column]) -> Column:
        return reduce(lambda a, b: a | b, [F.coalesce(c, F.lit(False)) for c in conditions], F.lit(False))

    corrupt = F.col("_corrupt").isNotNull()
    reason = (F.when(~F.is_valid_utf8("value"), F.lit(INVALID_UTF8))
              .when((corrupt & ~F.col("_cobj")) | F.col("_tail"), F.lit(MALFORMED_JSON))
              .when(any_of(missing), F.lit(MISSING_FIELD))
              .when(any_of([F.col(f"_w{i}") for i in range(len(names))]) | corrupt, F.lit(WRONG_TYPE))
              .when(any_of(bad_ts), F.lit(BAD_TIMESTAMP))
              .when(any_of(out_of_range), F.lit(EVENT_TIME_OUT_OF_RANGE))
              .when(any_of(bad_domain), F.lit(UNKNOWN_DOMAIN)))
    out = checked.select(*keep, *outputs, reason.alias("reason"))
    ref = F.col(value_column(fields.ref_field)) if fields.ref_field else F.lit(None).cast("string")
    return out.select(
        F.col(value_column(fields.id_field)).alias("id"),
        ref.alias("ref"),
        F.col(value_column(fields.ts_field)).alias("ts"),
        *[F.col(value_column(n)) for n in names if n not in (fields.id_field, fields.ts_field)],
        "reason", "value", "source_file", "part_day",
        F.xxhash64("value").alias("content_hash"),
    )


def first_by(df: DataFrame, keys: Sequence[str], order: Sequence[str | Column], name: str) -> DataFrame:
    """Adds ``name`` = 1, 2, ... within each key group, in a deterministic order."""
    return df.withColumn(name, F.row_number().over(Window.partitionBy(*keys).orderBy(*order)))
