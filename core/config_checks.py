"""Per-key checks of the pipeline config: every field coerced to its annotation, then held
to its key's rule (ranges, choices, known metrics and model kinds). Each config section runs
:func:`check_section` when it is built, so a bad value fails at load with the key's name,
never deep inside a stage."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.config import SPARK_XXHASH64_SEED, SSIM_MODES, SSIM_SELECTOR_INPUTS, ConfigError, _resolve

# --- per-key checks ------------------------------------------------------------------

Rule = Callable[[Any], "str | None"]  # None when the value is fine, else what is wrong


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the annotation ``hint`` wants it, or a ConfigError naming ``key``.

    Lenient only where YAML or an override commonly gives another spelling of the same value:
    an integral float or a digit string for an int, a numeric string for a float (PyYAML reads
    ``1e-3`` as a string), a date for a str (an unquoted ISO date). A bool is never a number.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for hint_option in inner[:-1]:  # the first alternative that takes the value, in order
            try:
                return coerce(value, hint_option, key)
            except ConfigError:
                continue
        return coerce(value, inner[-1], key)
    if origin is tuple:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {short_repr(value)}")
        return tuple(coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {short_repr(value)}")
        return {coerce(k, args[0], f"{key} (a key)"): coerce(v, args[1], f"{key}.{k}")
                for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {short_repr(value)}")
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {short_repr(value)}")
    if hint is float:
        number: float | None = None
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {short_repr(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {short_repr(value)}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, dt.date):
            return value.isoformat()
        raise ConfigError(f"{key}: expected a string, got {short_repr(value)}")
    if hint is Path:
        if isinstance(value, (str, os.PathLike)) and str(value):
            return _resolve(value)
        raise ConfigError(f"{key}: expected a path, got {short_repr(value)}")
    raise TypeError(f"{key}: the config has no coercion for {hint!r}")  # a new annotation: add one


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_section(obj: Any) -> None:
    """Coerce every field of a section to its annotation, then hold it to its rule."""
    name = type(obj).__name__.lower()
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{name}.{f.name}"
        value = coerce(getattr(obj, f.name), hints[f.name], key)
        object.__setattr__(obj, f.name, value)
        rule = RULES.get(key)
        problem = None if rule is None or value is None else rule(value)
        if problem:
            raise ConfigError(f"{key}: {problem}, got {short_repr(value)}")


def _at_least(low: float) -> Rule:
    return lambda v: None if v >= low else f"must be >= {low}"


def _above(low: float) -> Rule:
    return lambda v: None if v > low else f"must be > {low}"


def _within(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Rule:
    text = f"must lie in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"

    def rule(v: float) -> str | None:
        fine = (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
        return None if fine else text
    return rule


def _one_of(*choices: Any) -> Rule:
    return lambda v: None if v in choices else f"must be one of {choices}"


def _each(rule: Rule, *, non_empty: bool = False) -> Rule:
    """A rule for a list: every item follows ``rule`` (and there is at least one)."""
    def check(values: tuple[Any, ...]) -> str | None:
        if non_empty and not values:
            return "must not be empty"
        problems = [(i, p) for i, v in enumerate(values) if (p := rule(v))]
        return f"item {problems[0][0]} {problems[0][1]}" if problems else None
    return check


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _any(v: Any) -> str | None:  # any value of the annotated type (e.g. a signed delta)
    return None


def _regex(v: str) -> str | None:
    try:
        re.compile(v)
    except re.error as exc:
        return f"is not a regex ({exc})"
    return None


def _model_kind(v: str) -> str | None:
    from core.contracts import MODEL_KINDS  # core.contracts imports this module

    return None if v in MODEL_KINDS else f"must be a model kind, one of {MODEL_KINDS}"


def _ranking_metric(v: str) -> str | None:
    from core.contracts import RANKING_METRICS, is_ranking_metric

    if is_ranking_metric(v):
        return None
    return (f"must be a holdout AUC the evaluator logs: one of {RANKING_METRICS} or a "
            "per-domain cvr_auc_type/<type>, cvr_auc_scenario/<scenario>, "
            "cvr_auc_domain/<type>/<scenario>")


def _daily_cron(v: str) -> str | None:
    from core.schedule import cron_time  # core.schedule imports this module

    if len(v.split()) != 5:
        return "must be a five-field cron expression (the daily DAG's schedule)"
    try:
        cron_time(v)
    except ValueError:
        return "must run daily at a fixed minute and hour (e.g. '0 6 * * *')"
    return None


def _iso_day(v: str) -> str | None:
    from core.schedule import parse_day

    try:
        parse_day(v)
    except ValueError:
        return "must be an ISO date (YYYY-MM-DD)"
    return None


# The rule of every key beyond its type. tests/test_config.py holds that each numeric key
# has one, so a new key must say which values it takes.
RULES: dict[str, Rule] = {
    "paths.raw_root": _any, "paths.lake_root": _any, "paths.truth_root": _any,
    "paths.reports_root": _any,
    "domains.type_field": _non_empty, "domains.scenario_field": _non_empty,
    "domains.value_pattern": _regex, "domains.max_types": _at_least(1),
    "domains.max_scenarios": _at_least(1),
    "hashing.algorithm": _one_of("xxhash64"),
    "hashing.seed": lambda v: None if v == SPARK_XXHASH64_SEED else
    f"must be Spark's fixed xxhash64 seed {SPARK_XXHASH64_SEED} (serving hashes the same way)",
    "windows.click_window_minutes": _at_least(1), "windows.attribution_window_hours": _at_least(1),
    "windows.label_delay_days": _at_least(0), "windows.train_window_days": _at_least(1),
    "windows.holdout_rule": _one_of("latest_day"),
    "windows.cold_start_holdout_fraction": _within(0, 1, open_low=True, open_high=True),
    "generator.preset": _non_empty, "generator.impressions_per_day": _at_least(1),
    "generator.seed": _at_least(0), "generator.users": _at_least(1), "generator.ads": _at_least(1),
    "model.kind": _model_kind, "model.embedding_dim": _at_least(1),
    "model.ctr_hidden": _each(_at_least(1)), "model.cvr_hidden": _each(_at_least(1)),
    "model.alpha": _at_least(0), "model.domain_params": _one_of("full", "common_only"),
    "model.cvr_loss_weight": _at_least(0), "model.wide_fields": _each(_non_empty),
    "zoo.mmoe_experts": _at_least(1), "zoo.ple_shared_experts": _at_least(1),
    "zoo.ple_specific_experts": _at_least(1), "zoo.dpg_rank": _at_least(1),
    "zoo.dpg_generator_hidden": _at_least(1), "zoo.mi_dpg_weight": _at_least(0),
    "zoo.mi_dpg_discriminator_hidden": _at_least(1), "zoo.mi_dpg_rows": _at_least(1),
    "training.optimizer": _one_of("adagrad", "adam"), "training.learning_rate": _above(0),
    "training.batch_size": _at_least(1), "training.epochs": _at_least(1),
    "training.shuffle_buffer": _at_least(0), "training.read_batch_rows": _at_least(1),
    "training.seed": _at_least(0), "training.checkpoint_every_steps": _at_least(1),
    "training.validation_fraction": _within(0, 1, open_high=True),
    "training.early_stopping_patience": _at_least(0), "training.eval_every_steps": _at_least(1),
    "training.device": _one_of("auto", "cpu", "cuda"), "training.initial_accumulator": _at_least(0),
    "training.domain_lr_scale": _at_least(0), "training.domain_weight_decay": _at_least(0),
    "training.shared_weight_decay": _at_least(0),
    "training.checkpoint_retention": _at_least(0),
    "gate.metric": _ranking_metric, "gate.min_delta": _within(-1, 1), "gate.floor": _within(0, 1),
    "gate.min_domain_conversions": _at_least(0), "gate.domain_drop_tolerance": _within(0, 1),
    "evaluation.min_domain_conversions": _at_least(0), "evaluation.bootstrap_samples": _at_least(1),
    "evaluation.confidence": _within(0, 1, open_low=True, open_high=True),
    "ssim.mode": _one_of(*SSIM_MODES), "ssim.epsilon": _within(0, 1, open_low=True, open_high=True),
    "ssim.mask_weight": _at_least(0), "ssim.target_share": _within(0, 1, open_low=True),
    "ssim.shared_loss_weight": _at_least(0), "ssim.selector_hidden": _each(_at_least(1)),
    "ssim.selector_input": _one_of(*SSIM_SELECTOR_INPUTS), "ssim.selector_lr": _above(0),
    "ssim.selector_ema": _within(0, 1, open_high=True), "ssim.epochs": _at_least(1),
    "ssim.ratio_grid": _each(_within(0, 1), non_empty=True), "ssim.ratio_metric": _ranking_metric,
    "validation.trailing_days": _at_least(0), "validation.row_count_tolerance": _at_least(0),
    "validation.max_quarantine_share": _within(0, 1), "validation.drift_tolerance": _at_least(0),
    "validation.drift_error_factor": _at_least(1), "validation.drift_min_clicks": _at_least(0),
    "validation.max_missing_share": _within(0, 1), "validation.missing_share_increase": _within(0, 1),
    "mlflow.tracking_uri": _non_empty, "mlflow.artifact_root": _any,
    "mlflow.experiment": _non_empty, "mlflow.registered_model": _non_empty,
    "spark.master": _non_empty, "spark.driver_memory": _non_empty,
    "spark.shuffle_partitions": _at_least(1), "spark.output_files_per_day": _at_least(1),
    "spark.event_time_tolerance_minutes": _at_least(0), "spark.max_lost_bytes_share": _within(0, 1),
    "airflow.schedule": _daily_cron, "airflow.start_date": _iso_day, "airflow.retries": _at_least(0),
    "airflow.retry_delay_minutes": _at_least(0), "airflow.spark_timeout_minutes": _at_least(1),
    "airflow.train_timeout_minutes": _at_least(1), "airflow.parallelism": _at_least(1),
    "serving.max_request_records": _at_least(1), "serving.tower_cache_mb": _at_least(0),
}
