"""Deterministic raw-log generator: impressions, clicks and conversions for a date range.

Why it exists: the pipeline needs multi-domain logs whose labels depend on the domain
(conversion type x display scenario) in ways a single shared network fits worse than
per-domain parameters, with a known ground truth to report oracle AUC, and with
realistic defects to exercise the Spark job's quarantine. Everything is seeded: a day's
logs depend only on (config, preset, seed, day), never on the date range asked for.

Layout written (the raw-log contract, README "Raw-log contract"):
``<raw_root>/<log>/dt=P/part-<k>.<ext>`` where ``k = P - impression day``: clicks and
conversions of day D's impressions that land on a later day P go to that day's partition
under their own file name, so generating day D never clobbers what day D-1 wrote there.
True probabilities go to ``cfg.paths.truth_file(D)``, never into the logs.

This module is the driver and the CLI (``python -m simulation.generate_logs``); the parts
live beside it: :mod:`~simulation.presets`, :mod:`~simulation.world` (population, label
model, simulation), :mod:`~simulation.tables`, :mod:`~simulation.faults` and
:mod:`~simulation.writers`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.config import PipelineConfig, add_config_arguments, load_config
from simulation.columns import table_column
from simulation.faults import (
    MAX_FAULT_RATE,
    UNKNOWN_DOMAIN_VALUES,
    LogContext,
    apply_line_faults,
    apply_record_faults,
    field_kinds,
    plan_faults,
)
from simulation.presets import OS_NAMES, PRESETS, Preset
from simulation.tables import DayNames, click_table, conversion_table, impression_table
from simulation.world import (
    DAY_MS,
    LATE_CLICK_MAX_MS,
    LATE_CONV_MAX_MS,
    REPEAT_CLICK_MAX_MS,
    World,
    build_world,
    simulate,
)
from simulation.writers import FORMATS, LOGS, NEEDS_ESCAPE, DayOutput, to_json_lines

CHUNK_ROWS = 250_000  # impressions simulated and written per step: bounds memory at any scale


def _day_index(ts: pa.Array, default_ms: int) -> np.ndarray:
    """Event day of each row (days since epoch); rows whose ts was blanked use the default."""
    return pc.fill_null(ts.cast(pa.int64()), default_ms).to_numpy() // DAY_MS


def _max_offset(cfg: PipelineConfig) -> int:
    span = (cfg.windows.click_window_minutes * 60_000 + LATE_CLICK_MAX_MS + REPEAT_CLICK_MAX_MS
            + cfg.windows.attribution_window_hours * 3_600_000 + LATE_CONV_MAX_MS)
    return math.ceil(span / DAY_MS) + 1


def _check_preset(cfg: PipelineConfig, preset: Preset) -> None:
    pattern = re.compile(cfg.domains.value_pattern)
    bad = [v for v in (*preset.types, *preset.scenarios) if not pattern.fullmatch(v)]
    if bad:
        raise ValueError(f"preset {preset.name!r}: values {bad} break domains.value_pattern")


def _escape_free_text(cfg: PipelineConfig, preset: Preset) -> bool:
    """True when every string the generator can write is free of JSON escapes, so the
    per-row scan can be skipped (strings are built from these names and digits)."""
    texts = [*preset.types, *preset.scenarios, *OS_NAMES, *UNKNOWN_DOMAIN_VALUES,
             *(f.name for f in cfg.features), *(n for spec in cfg.logs.values() for n in spec.required)]
    return not any(re.search(NEEDS_ESCAPE, t) for t in texts)


def _emit(out: DayOutput, log: str, table: pa.Table, ctx: LogContext, rate: float,
          frng: np.random.Generator, imp_ts: np.ndarray) -> None:
    """Inject faults (if any), format and write one log's chunk."""
    on_day = _day_index(table_column(table, "ts"), ctx.day_start_ms) == ctx.day_start_ms // DAY_MS
    plan = plan_faults(log, on_day, rate, frng) if rate > 0 else {}
    if plan:
        table = apply_record_faults(table, plan, ctx, frng, imp_ts)
    if "_click_ts" in table.column_names:
        table = table.drop_columns(["_click_ts"])
    lines = None
    if out.fmt != "parquet":
        lines = to_json_lines(table, ctx.trusted)
        if plan:
            lines = apply_line_faults(lines, plan, ctx, frng)
    out.write(log, table, lines, _day_index(table_column(table, "ts"), ctx.day_start_ms))


def generate_day(cfg: PipelineConfig, world: World, day: dt.date, n: int, seed: int,
                 fault_rate: float, fmt: str) -> dict[str, dict[str, int]]:
    """All logs of one impression day, chunk by chunk, plus its truth file."""
    names = DayNames.of(cfg, day)
    day_start = (day - dt.date(1970, 1, 1)).days * DAY_MS
    rng = np.random.default_rng(np.random.SeedSequence([seed, day.toordinal(), 1]))
    frng = np.random.default_rng(np.random.SeedSequence([seed, day.toordinal(), 2]))
    click_window_ms = cfg.windows.click_window_minutes * 60_000
    attribution_ms = cfg.windows.attribution_window_hours * 3_600_000
    safe = _escape_free_text(cfg, world.preset)
    ctxs = {}
    for log in LOGS:
        kinds = field_kinds(cfg, log)
        trusted = frozenset(k for k, v in kinds.items() if v == "string") if safe else frozenset()
        ctxs[log] = LogContext(log, names, kinds, tuple(cfg.logs[log].required), fmt, day_start, trusted)

    out = DayOutput(cfg, day, fmt)
    out.remove_stale(_max_offset(cfg))
    truth_path = cfg.paths.truth_file(day.isoformat())
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    truth_schema = pa.schema([("impression_id", pa.string()), ("p_click", pa.float64()),
                              ("p_conversion", pa.float64())])
    n_clicks = n_convs = 0
    try:
        with pq.ParquetWriter(truth_path, truth_schema) as truth:
            for lo in range(0, n, CHUNK_ROWS):
                hi = min(n, lo + CHUNK_ROWS)
                ev = simulate(world, rng, hi - lo, day_start + lo * DAY_MS // n, day_start + hi * DAY_MS // n,
                              click_window_ms, attribution_ms)
                imps = impression_table(cfg, world, ev, names, lo, rng)
                clicks = click_table(ev, names, table_column(imps, names.imp_id), n_clicks)
                convs = conversion_table(ev, names, table_column(clicks, names.click_id), n_convs)
                n_clicks += clicks.num_rows
                n_convs += convs.num_rows
                truth.write_table(pa.table({"impression_id": table_column(imps, names.imp_id),
                                            "p_click": ev.p_click, "p_conversion": ev.p_conversion},
                                           schema=truth_schema))
                for log, table in (("impressions", imps), ("clicks", clicks), ("conversions", convs)):
                    _emit(out, log, table, ctxs[log], fault_rate, frng, ev.ts)
    finally:
        out.close()
    return out.counts


def generate(cfg: PipelineConfig, start_day: str, days: int, *, preset: str | None = None,
             impressions_per_day: int | None = None, seed: int | None = None,
             fault_rate: float = 0.0, fmt: str = "jsonl") -> dict[str, dict[str, int]]:
    """Write raw logs for ``days`` impression days from ``start_day``; returns lines written
    per log and partition day (``{"impressions": {"2026-11-01": n, ...}, ...}``)."""
    preset_name = preset or cfg.generator.preset
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose from {sorted(PRESETS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if not 0.0 <= fault_rate <= MAX_FAULT_RATE:
        raise ValueError(f"fault_rate must lie in [0, {MAX_FAULT_RATE}]")
    if days < 1:
        raise ValueError("days must be >= 1")
    n = int(impressions_per_day if impressions_per_day is not None else cfg.generator.impressions_per_day)
    if n < 1:
        raise ValueError("impressions_per_day must be >= 1")
    run_seed = int(seed if seed is not None else cfg.generator.seed)
    chosen = PRESETS[preset_name]
    _check_preset(cfg, chosen)
    world = build_world(cfg, chosen, run_seed)
    first = dt.date.fromisoformat(start_day)
    totals: dict[str, dict[str, int]] = {log: {} for log in LOGS}
    for i in range(days):
        counts = generate_day(cfg, world, first + dt.timedelta(days=i), n, run_seed, fault_rate, fmt)
        for log, per_day in counts.items():
            for part_day, count in per_day.items():
                totals[log][part_day] = totals[log].get(part_day, 0) + count
    return {log: dict(sorted(per_day.items())) for log, per_day in totals.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.generate_logs",
        description="Write deterministic synthetic raw logs (impressions, clicks, conversions) "
                    "and the true probabilities, per the raw-log contract.",
    )
    parser.add_argument("--start", required=True, help="first impression day, YYYY-MM-DD")
    parser.add_argument("--days", type=int, default=1, help="number of impression days (default 1)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: generator.preset")
    parser.add_argument("--impressions-per-day", type=int, help="default: generator.impressions_per_day")
    parser.add_argument("--seed", type=int, help="default: generator.seed")
    parser.add_argument("--fault-rate", type=float, default=0.0,
                        help="inject each defect class at this rate (default 0: clean logs)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="jsonl")
    return add_config_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, overrides=args.overrides)
    try:
        dt.date.fromisoformat(args.start)
    except ValueError:
        raise SystemExit(f"--start {args.start!r} is not a date (YYYY-MM-DD)") from None
    counts = generate(cfg, args.start, args.days, preset=args.preset,
                      impressions_per_day=args.impressions_per_day, seed=args.seed,
                      fault_rate=args.fault_rate, fmt=args.fmt)
    print(f"raw logs under {cfg.paths.raw_root} (format {args.fmt}), truth under {cfg.paths.truth_root}")
    for log, per_day in counts.items():
        cells = ", ".join(f"{d}: {c}" for d, c in per_day.items())
        print(f"  {log:<12} {sum(per_day.values()):>10} lines  [{cells}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
