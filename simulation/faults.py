"""Fault injection: the defects the Spark job must quarantine or explain, each class at a
given rate (record-level faults in both formats, line-level faults in JSON lines only).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.config import PipelineConfig
from simulation.columns import id_strings, ms_timestamps, table_column
from simulation.tables import DayNames
from simulation.world import DAY_MS

FAULT_CLASSES: dict[str, tuple[str, ...]] = {
    "impressions": ("malformed_json", "missing_field", "wrong_type", "bad_timestamp", "duplicate",
                    "empty_domain", "unknown_domain", "invalid_utf8"),
    "clicks": ("malformed_json", "missing_field", "wrong_type", "bad_timestamp", "duplicate",
               "orphan", "invalid_utf8"),
    "conversions": ("malformed_json", "missing_field", "wrong_type", "bad_timestamp", "duplicate",
                    "orphan", "before_click", "invalid_utf8"),
}
LINE_FAULTS = ("malformed_json", "missing_field", "wrong_type", "bad_timestamp", "invalid_utf8")
PARQUET_SKIPPED_FAULTS = ("malformed_json", "wrong_type", "bad_timestamp", "invalid_utf8")
UNKNOWN_DOMAIN_VALUES = ("Purchase", "sign up", "näh", "type-07", "9lives", "x" * 70)
BAD_TIMESTAMPS = ("2026-13-45T25:61:00Z", "yesterday", "21/11/2026 13:45:12", "2026-02-30T10:00:00Z",
                  "2026-11-21 13:45:12")
MAX_FAULT_RATE = 0.1


@dataclass
class LogContext:
    """What formatting and fault injection need to know about one log, from the config."""

    log: str
    names: DayNames
    kinds: dict[str, str]  # field -> string | timestamp | number
    required: tuple[str, ...]
    fmt: str
    day_start_ms: int
    trusted: frozenset[str] = frozenset()  # string fields that never need JSON escaping
    orphan_counter: int = 0


def field_kinds(cfg: PipelineConfig, log: str) -> dict[str, str]:
    kinds = {name: ("timestamp" if t == "timestamp" else "string" if t == "string" else "number")
             for name, t in cfg.logs[log].required.items()}
    if log == "impressions":
        for f in cfg.features:
            kinds.setdefault(f.name, "string" if f.kind == "categorical" else "number")
    return kinds


def plan_faults(log: str, on_day: np.ndarray, rate: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Disjoint row sets, ceil(rate * n) rows per class, so each class shows up at any size.

    Rows whose event falls on the impression day (``on_day``) are used first and dealt
    round-robin, so every class lands in day D's own partitions, whose build owns it."""
    n_rows = len(on_day)
    k = math.ceil(rate * n_rows) if rate > 0 and n_rows else 0
    order = rng.permutation(n_rows)
    order = order[np.argsort(~on_day[order], kind="stable")]
    classes = [c for c in FAULT_CLASSES[log] if c != "orphan"]
    taken = order[: k * len(classes)]
    plan = {cls: np.sort(taken[i:: len(classes)]) for i, cls in enumerate(classes)}
    if "orphan" in FAULT_CLASSES[log]:
        plan["orphan"] = np.arange(k)
    return plan


def _replace(arr: pa.Array, rows: np.ndarray, values: list[Any]) -> pa.Array:
    mask = np.zeros(len(arr), dtype=bool)
    mask[rows] = True
    order = np.argsort(rows, kind="stable")
    return pc.replace_with_mask(arr, pa.array(mask), pa.array([values[i] for i in order], arr.type))


def _set_column(table: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, arr)


def _domain_faults(table: pa.Table, plan: dict[str, np.ndarray], ctx: LogContext,
                   rng: np.random.Generator) -> pa.Table:
    for cls in ("empty_domain", "unknown_domain"):
        rows = plan.get(cls, np.array([], np.int64))
        if not len(rows):
            continue
        use_type = rng.random(len(rows)) < 0.5
        for field, pick in ((ctx.names.type_field, use_type), (ctx.names.scenario_field, ~use_type)):
            sel = rows[pick]
            if len(sel):
                values = ["" if cls == "empty_domain" else str(rng.choice(UNKNOWN_DOMAIN_VALUES)) for _ in sel]
                table = _set_column(table, field, _replace(table_column(table, field), sel, values))
    return table


def _before_click(table: pa.Table, rows: np.ndarray, rng: np.random.Generator) -> pa.Table:
    """Move conversions to just before their click, on the click's own day."""
    all_click_ts = table_column(table, "_click_ts").to_numpy()
    rows = rows[all_click_ts[rows] % DAY_MS > 0]  # a click at 00:00:00.000 has no room before it
    if not len(rows):
        return table
    click_ts = all_click_ts[rows]
    since_midnight = click_ts % DAY_MS
    delta = 1 + np.floor(rng.random(len(rows)) * np.minimum(np.maximum(since_midnight - 1, 0), 1_800_000))
    ts = table_column(table, "ts").cast(pa.int64()).to_numpy().copy()
    ts[rows] = click_ts - delta.astype(np.int64)
    return _set_column(table, "ts", ms_timestamps(ts))


def _orphans(table: pa.Table, count: int, ctx: LogContext, rng: np.random.Generator,
             imp_ts: np.ndarray) -> pa.Table:
    """Clicks for unknown impressions / conversions for unknown clicks, dated on the day."""
    if not count or not len(imp_ts):
        return table
    first = ctx.orphan_counter
    ctx.orphan_counter += count
    serial = np.arange(first, first + count)
    ts = np.minimum(imp_ts[rng.integers(len(imp_ts), size=count)] + 1000, ctx.day_start_ms + DAY_MS - 1)
    tag = ctx.names.tag
    if ctx.log == "clicks":
        cols = {ctx.names.click_id: id_strings(f"clk-{tag}-orphan-", serial, 6),
                ctx.names.imp_id: id_strings(f"imp-{tag}-ghost-", serial, 6)}
    else:
        cols = {ctx.names.conv_id: id_strings(f"cnv-{tag}-orphan-", serial, 6),
                ctx.names.click_id: id_strings(f"clk-{tag}-ghost-", serial, 6)}
    cols["ts"] = ms_timestamps(ts)
    if "_click_ts" in table.column_names:
        cols["_click_ts"] = pa.array(ts, pa.int64())
    return pa.concat_tables([table, pa.table(cols).select(table.column_names).cast(table.schema)])


def _null_fields(table: pa.Table, rows: np.ndarray, ctx: LogContext, rng: np.random.Generator) -> pa.Table:
    """Parquet's form of a missing required field: a null."""
    for row in rows:
        name = ctx.required[rng.integers(len(ctx.required))]
        table = _set_column(table, name, _replace(table_column(table, name), np.array([row]), [None]))
    return table


def apply_record_faults(table: pa.Table, plan: dict[str, np.ndarray], ctx: LogContext,
                        rng: np.random.Generator, imp_ts: np.ndarray) -> pa.Table:
    """Faults that live in the record itself (both formats): values, extra and moved rows."""
    if ctx.log == "impressions":
        table = _domain_faults(table, plan, ctx, rng)
    if ctx.log == "conversions":
        table = _before_click(table, plan.get("before_click", np.array([], np.int64)), rng)
    if ctx.fmt == "parquet":
        table = _null_fields(table, plan.get("missing_field", np.array([], np.int64)), ctx, rng)
    dup = plan.get("duplicate", np.array([], np.int64))
    if len(dup):
        table = pa.concat_tables([table, table.take(pa.array(dup))])
    return _orphans(table, len(plan.get("orphan", ())), ctx, rng, imp_ts)


def _wrong_value(kind: str, rng: np.random.Generator) -> Any:
    if kind == "number":
        return str(rng.choice(["n/a", "12abc", "thirty"]))
    if kind == "timestamp":
        return 1763732712123
    return [12345, {"v": 1}, True, [1, 2]][rng.integers(4)]


def corrupt_line(cls: str, line: bytes, ctx: LogContext, rng: np.random.Generator) -> bytes:
    """One line-level defect: broken JSON or UTF-8, a dropped field, a wrong type or bad ts."""
    body = line.rstrip(b"\n")
    if cls == "malformed_json":
        cut = int(rng.integers(1, max(2, len(body) - 1)))
        while cut > 1 and (body[cut] & 0xC0) == 0x80:  # never split a UTF-8 sequence
            cut -= 1
        return body[:cut] + b"\n"
    if cls == "invalid_utf8":
        pos = body.find(b'":"')
        pos = pos + 3 if pos >= 0 else 1
        return body[:pos] + b"\xff\xfe" + body[pos:] + b"\n"
    rec = json.loads(body)
    if cls == "missing_field":
        present = [f for f in ctx.required if f in rec]
        del rec[present[rng.integers(len(present))]]
    elif cls == "wrong_type":
        candidates = [f for f in ctx.kinds if f in rec]
        name = candidates[rng.integers(len(candidates))]
        rec[name] = _wrong_value(ctx.kinds[name], rng)
    elif cls == "bad_timestamp":
        ts_field = next(f for f, k in ctx.kinds.items() if k == "timestamp")
        options = [*BAD_TIMESTAMPS, str(rec.get(ts_field, "")).rstrip("Z")]
        rec[ts_field] = options[rng.integers(len(options))]
    else:
        raise ValueError(f"{cls} is not a line fault")
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def apply_line_faults(lines: pa.Array, plan: dict[str, np.ndarray], ctx: LogContext,
                      rng: np.random.Generator) -> pa.Array:
    rows: list[int] = []
    values: list[bytes] = []
    for cls in LINE_FAULTS:
        for row in plan.get(cls, ()):
            rows.append(int(row))
            values.append(corrupt_line(cls, lines[int(row)].as_py(), ctx, rng))
    if not rows:
        return lines
    return _replace(lines, np.array(rows), values)
