"""Vectorized pyarrow column helpers shared by the tables, the faults and the writers, and
the impression fields the world gives meaning to (their values carry label effects).

A leaf module (no import of the world), so :mod:`simulation.world` can ask which
configured fields are semantic without a circular import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from simulation.presets import OS_NAMES

if TYPE_CHECKING:
    from simulation.world import Events, World

def id_strings(prefix: str, numbers: np.ndarray, width: int = 0) -> pa.Array:
    """Vectorized ``f"{prefix}{n:0{width}d}"``."""
    text = pc.cast(pa.array(np.asarray(numbers, dtype=np.int64)), pa.string())
    if width:
        text = pc.utf8_lpad(text, width=width, padding="0")
    return pc.binary_join_element_wise(prefix, text, "")


def name_strings(names: Sequence[str], idx: np.ndarray) -> pa.Array:
    return pa.array(list(names), pa.string()).take(pa.array(np.asarray(idx, dtype=np.int64)))


def with_nulls(arr: pa.Array, mask: np.ndarray) -> pa.Array:
    if not mask.any():
        return arr
    return pc.if_else(pa.array(mask), pa.scalar(None, arr.type), arr)


def ms_timestamps(ms: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(ms, dtype=np.int64), pa.timestamp("ms", tz="UTC"))


SEMANTIC_FIELDS: dict[str, Callable[[World, Events], pa.Array]] = {
    "user_id": lambda w, e: id_strings("u", e.user),
    "ad_id": lambda w, e: id_strings("a", e.ad),
    "advertiser_id": lambda w, e: id_strings("adv", w.ad_advertiser[e.ad]),
    "ad_category": lambda w, e: id_strings("cat_", w.ad_category[e.ad], 2),
    "device_os": lambda w, e: name_strings(OS_NAMES, w.user_os[e.user]),
    "user_age": lambda w, e: pa.array(w.user_age[e.user], pa.float64(), from_pandas=True),
    "bid_price": lambda w, e: pa.array(w.ad_bid[e.ad], pa.float64()),
}
NATURALLY_MISSING = {"user_age"}


def table_column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], col.type)

