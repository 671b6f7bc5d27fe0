"""The config is the single source of truth: overrides, validation and paths behave."""

from __future__ import annotations

import copy

import pytest
import yaml

from core.config import ConfigError, config_from_mapping, load_config


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
