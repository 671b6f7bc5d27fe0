"""Pure-Python feature hashing, identical to the Spark job's (serving relies on this).

Categorical value v of field f  ->  1 + pmod(xxhash64(utf8("f=v"), seed=42), buckets - 1)
Numeric value x of field f       ->  1 + #{boundaries b : b <= x}
Missing (None, "", NaN)          ->  0
xxhash64 is read as a signed 64-bit integer, as Spark's ``xxhash64`` returns it, and
pmod is the non-negative modulus (Python's ``%`` for a positive divisor).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import xxhash

from core.config import FeatureField

MISSING_ID = 0


def signed_xxhash64(text: str, seed: int = 42) -> int:
    """xxhash64 of the UTF-8 bytes of ``text`` as a signed int64 (Spark's convention)."""
    unsigned = xxhash.xxh64_intdigest(text.encode("utf-8"), seed=seed)
    return unsigned - (1 << 64) if unsigned >= (1 << 63) else unsigned


def is_missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def categorical_id(field: FeatureField, value: Any, seed: int = 42) -> int:
    if is_missing(value):
        return MISSING_ID
    return 1 + signed_xxhash64(f"{field.name}={value}", seed) % (field.buckets - 1)


def numeric_id(field: FeatureField, value: Any) -> int:
    """Bucket index of a numeric value; raises TypeError for values that aren't numbers."""
    if is_missing(value):
        return MISSING_ID
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"field {field.name!r} is numeric, got {type(value).__name__} {value!r}")
    return 1 + bisect.bisect_right(field.boundaries, float(value))


def feature_id(field: FeatureField, value: Any, seed: int = 42) -> int:
    if field.kind == "categorical":
        return categorical_id(field, value, seed)
    return numeric_id(field, value)


def hash_record(
    features: Iterable[FeatureField], record: Mapping[str, Any], seed: int = 42
) -> list[int]:
    """Ids of every configured feature of one raw impression record, in config order."""
    return [feature_id(f, record.get(f.name), seed) for f in features]
