"""The config is the single source of truth: overrides, validation and paths behave."""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, PipelineConfig, config_from_mapping, load_config


def test_defaults_load_and_resolve_paths():
    cfg = load_config(environ={})
    assert cfg.paths.samples_dir("2026-11-01").name == "dt=2026-11-01"
    assert cfg.paths.raw_root.is_absolute()
    assert cfg.mlflow.tracking_uri.startswith("sqlite:////")
    assert [f.column for f in cfg.features][0] == "feat_user_id"
    assert cfg.features[-1].cardinality == len(cfg.features[-1].boundaries) + 2


def test_env_then_cli_overrides_take_precedence():
    env = {"MMN__TRAINING__EPOCHS": "4", "MMN__MODEL__CVR_HIDDEN": "[32, 16]"}
    cfg = load_config(environ=env)
    assert cfg.training.epochs == 4 and cfg.model.cvr_hidden == (32, 16)
    cfg = load_config(environ=env, overrides=["training.epochs=7"])
    assert cfg.training.epochs == 7


def test_config_hash_tracks_effective_values():
    a = load_config(environ={})
    b = a.with_overrides({"gate.min_delta": 0.01})
    assert a.config_hash() != b.config_hash()
    assert a.config_hash() == load_config(environ={}).config_hash()


@pytest.mark.parametrize(
    "override, message",
    [
        (["training.nope=1"], "unknown key"),
        (["hashing.seed=7"], "seed 42"),
        (["model.domain_params=weird"], "common_only"),
        (["windows.cold_start_holdout_fraction=1.5"], "cold_start_holdout_fraction"),
        (["training.epochs"], "section.key=value"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(environ={}, overrides=override)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_an_older_bundle_lacking_a_newer_key_loads_with_the_behaviour_it_was_trained_with():
    """A champion logged before ``training.domain_lr_scale`` existed trained every parameter at
    one rate: its bundle config must still load (the gate compares against it), as 1.0."""
    raw = copy.deepcopy(load_config(environ={}).raw)
    del raw["training"]["domain_lr_scale"]
    assert config_from_mapping(raw).training.domain_lr_scale == 1.0
    del raw["training"]["learning_rate"]  # a key that always existed is still required
    with pytest.raises(ConfigError, match="lacks keys"):
        config_from_mapping(raw)


def test_a_yaml_file_must_name_every_key(tmp_path):
    raw = copy.deepcopy(load_config(environ={}).raw)
    del raw["training"]["domain_lr_scale"]
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="domain_lr_scale"):
        load_config(path, environ={})


def test_java_options_reach_the_driver_and_executors_of_every_spark_submit():
    from mmn.tasks import spark_submit_command

    cfg = load_config(environ={}, overrides=["spark.java_options=-XX:+UseParallelGC -Xss4m"])
    command = spark_submit_command(cfg, "2026-11-02")
    for role in ("driver", "executor"):
        assert f"spark.{role}.extraJavaOptions=-XX:+UseParallelGC -Xss4m" in command
    unset = spark_submit_command(load_config(environ={}, overrides=["spark.java_options="]), "2026-11-02")
    assert not any("extraJavaOptions" in arg for arg in unset)


# --- issue 17, item 8: every key checked at load, names that must exist, the effective config


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.epochs=abc", "training.epochs: expected an integer, got 'abc'"),
        ("gate.floor=abc", "gate.floor: expected a number, got 'abc'"),
        ("training.batch_size=0", "training.batch_size: must be >= 1, got 0"),
        ("training.learning_rate=-1", r"training.learning_rate: must be > 0, got -1.0"),
        ("training.epochs=2.5", "training.epochs: expected an integer, got 2.5"),
        ("training.epochs=true", "training.epochs: expected an integer, got True"),
        ("model.wide=1", "model.wide: expected true or false, got 1"),
        ("model.wide_fields=[user_id, nope]", r"model.wide_fields: \['nope'\] are not feature fields"),
        ("model.wide_fields=[device_os, device_os]", "model.wide_fields repeat"),
        ("model.cvr_hidden=[64, 0]", r"model.cvr_hidden: item 1 must be >= 1"),
        ("model.ctr_hidden=[64, x]", r"model.ctr_hidden\[1\]: expected an integer, got 'x'"),
        ("gate.floor=1.5", r"gate.floor: must lie in \[0, 1\]"),
        ("validation.max_quarantine_share=-0.1", "validation.max_quarantine_share: must lie in"),
        ("spark.shuffle_partitions=0", "spark.shuffle_partitions: must be >= 1"),
        ("training.learning_rate=.nan", "training.learning_rate: expected a finite number"),
        ("serving.max_request_records=0", "serving.max_request_records: must be >= 1"),
        ("paths.lake_root=[1]", "paths.lake_root: expected a path"),
        ("logs.clicks.id_field=nope", "logs.clicks.id_field: must name one of the required fields"),
        ("airflow.start_date=2026-13-01", r"airflow.start_date: must be an ISO date"),
        ("airflow.schedule=@daily", "airflow.schedule: must be a five-field cron"),
        ("airflow.schedule=*/5 6 * * *", "airflow.schedule: must run daily at a fixed minute and hour"),
    ],
)
def test_every_key_is_checked_at_load_and_the_error_names_it(override, message):
    """Issue 17 item 8: a bad type or range fails at load, naming the key, not deep in training."""
    with pytest.raises(ConfigError, match=message):
        load_config(environ={}, overrides=[override])


def test_env_overrides_are_checked_like_set_ones():
    with pytest.raises(ConfigError, match="training.epochs: expected an integer, got 'abc'"):
        load_config(environ={"MMN__TRAINING__EPOCHS": "abc"})


def test_values_yaml_spells_differently_are_coerced_to_the_key_type():
    """PyYAML reads ``1e-3`` as a string and an unquoted date as a date: both mean the key's type."""
    cfg = load_config(environ={}, overrides=["training.learning_rate=1e-3", "airflow.start_date=2026-11-05",
                                             "training.epochs=4.0", "ssim.ratio_grid=[0, 1]"])
    assert cfg.training.learning_rate == 0.001 and isinstance(cfg.training.learning_rate, float)
    assert cfg.airflow.start_date == "2026-11-05" and cfg.training.epochs == 4
    assert cfg.ssim.ratio_grid == (0.0, 1.0) and all(isinstance(r, float) for r in cfg.ssim.ratio_grid)


def test_a_section_built_with_replace_is_checked_too():
    cfg = load_config(environ={})
    with pytest.raises(ConfigError, match="training.batch_size: must be >= 1"):
        dataclasses.replace(cfg.training, batch_size=0)
    with pytest.raises(ConfigError, match="gate.metric"):
        dataclasses.replace(cfg.gate, metric="cvr_acu_type_avg")


def test_every_numeric_key_states_its_range():
    """A new int/float key must be given a rule in core.config_checks.RULES (a range or 'any')."""
    from core import config as config_module
    from core import config_checks

    cfg = load_config(environ={})
    unruled = []
    for section in dataclasses.fields(PipelineConfig):
        value = getattr(cfg, section.name)
        if not isinstance(value, config_module._Section):  # checks itself (e.g. runtime)
            continue
        assert type(value).__name__.lower() == section.name  # the section's key in messages
        hints = typing.get_type_hints(type(value))
        for f in dataclasses.fields(value):
            key = f"{section.name}.{f.name}"
            if key not in config_checks.RULES and re.search(r"\b(int|float)\b", str(hints[f.name])):
                unruled.append(key)
    assert not unruled


@pytest.mark.parametrize("key", ["gate.metric", "ssim.ratio_metric"])
def test_metric_names_must_be_a_holdout_auc_the_evaluator_logs(key):
    """A misspelled gate.metric used to reject every challenger silently (undefined metric)."""
    for bad in ("cvr_auc_type_average", "cvr_logloss", "oracle_cvr_auc", "cvr_auc_type/"):
        with pytest.raises(ConfigError, match=f"{key}: must be a holdout AUC"):
            load_config(environ={}, overrides={key: bad})
    for good in ("cvr_auc_domain_avg_observed", "ctcvr_auc", "cvr_auc_type/purchase",
                 "cvr_auc_domain/purchase/feed"):
        section, name = key.split(".")
        assert getattr(getattr(load_config(environ={}, overrides={key: good}), section), name) == good


def test_ranking_metric_names_match_what_the_evaluator_produces():
    """core.contracts' list (torch-free, read at load) against training.metrics' real output."""
    import numpy as np
    import pandas as pd

    from core.contracts import RANKING_METRICS, is_ranking_metric
    from training.metrics import metrics_from_predictions

    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame({"type_id": rng.integers(0, 2, n), "scenario_id": rng.integers(0, 2, n),
                          "click": np.tile([0, 1, 1, 1], n // 4), "conversion": np.tile([0, 0, 1, 0], n // 4),
                          "p_ctr": rng.random(n), "p_cvr": rng.random(n)})
    frame["p_ctcvr"] = frame["p_ctr"] * frame["p_cvr"]
    produced = metrics_from_predictions(frame, ["purchase", "form"], ["feed", "banner"], min_domain_conversions=1)
    assert set(RANKING_METRICS) <= set(produced)
    aucs = {k for k in produced if "_auc" in k and not k.startswith("n_")}
    assert aucs and all(is_ranking_metric(k) for k in aucs)
    assert not any(is_ranking_metric(k) for k in set(produced) - aucs)


def test_model_kind_must_be_one_the_zoo_builds():
    from core.contracts import MODEL_KINDS
    from mmn import model_kinds

    assert model_kinds.MODEL_KINDS is MODEL_KINDS  # one list; test_baselines checks the zoo's keys
    with pytest.raises(ConfigError, match="model.kind: must be a model kind"):
        load_config(environ={}, overrides=["model.kind=mnm"])
    assert load_config(environ={}, overrides=["model.kind=dnn"]).model.kind == "dnn"


def test_serving_is_a_typed_section_and_an_older_bundle_takes_its_default():
    cfg = load_config(environ={})
    assert cfg.serving.max_request_records == cfg.raw["serving"]["max_request_records"]
    without = {k: v for k, v in copy.deepcopy(cfg.raw).items() if k != "serving"}
    assert config_from_mapping(without).serving.max_request_records == 50_000
    with pytest.raises(ConfigError, match="serving.max_request_records: expected an integer"):
        load_config(environ={}, overrides=["serving.max_request_records=lots"])


def test_source_overrides_rebuild_the_effective_config():
    """What the Spark job gets beside --config: env and --set overrides, read back equal."""
    cfg = load_config(environ={"MMN__TRAINING__LEARNING_RATE": "0.00001"},
                      overrides=["paths.lake_root=/tmp/elsewhere", "spark.java_options=-Da=b -Dc=d",
                                 "features=[{name: u, kind: categorical, buckets: 9}]"])
    overrides = cfg.source_overrides()
    assert "paths.lake_root=/tmp/elsewhere" in overrides and len(overrides) == 4
    again = load_config(cfg.source, overrides=overrides, environ={})
    assert again.config_hash() == cfg.config_hash() and again.paths.lake_root == Path("/tmp/elsewhere")
    assert load_config(environ={}).source_overrides() == []


def test_every_day_argument_is_parsed_by_core_schedule_parse_day():
    """Known once: the CLIs' day types and the DAG helpers give parse_day's message."""
    import argparse

    from mmn.backfill import range_for_days
    from spark_jobs.build_samples import _day as build_day_arg
    from validation.runner import _iso_day

    for parse in (build_day_arg, _iso_day):
        assert parse("2026-11-02") == "2026-11-02"
        with pytest.raises(argparse.ArgumentTypeError, match=r"'2026-02-30' is not an ISO date"):
            parse("2026-02-30")
    with pytest.raises(ValueError, match=r"'2026-2-3' is not an ISO date"):
        range_for_days(load_config(environ={}), "2026-11-01", "2026-2-3")
