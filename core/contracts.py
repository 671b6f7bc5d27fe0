"""The samples dataset's contract: column names and the model's input fields, known once.

The Spark job writes these columns, the GX suite checks them, the data loader reads them,
the evaluator and serving name them. Change a name here and every stage follows.
"""

from __future__ import annotations

from core.config import PipelineConfig

ID_COLUMN = "impression_id"
TYPE_ID = "type_id"
SCENARIO_ID = "scenario_id"
DOMAIN_COLUMNS = (TYPE_ID, SCENARIO_ID)
CLICK = "click"
CONVERSION = "conversion"
LABEL_COLUMNS = (CLICK, CONVERSION)
SPLITS = ("train", "holdout")


def feature_columns(cfg: PipelineConfig) -> list[str]:
    """Hashed id columns of the feature fields, in config order (the model's input order)."""
    return [f.column for f in cfg.features]


def domain_fields(cfg: PipelineConfig) -> list[str]:
    """Raw domain fields of an impression: conversion type, then display scenario."""
    return [cfg.domains.type_field, cfg.domains.scenario_field]


def model_fields(cfg: PipelineConfig) -> list[str]:
    """The model's input fields by name: features in config order, then the two domain fields."""
    return [f.name for f in cfg.features] + domain_fields(cfg)


def request_fields(cfg: PipelineConfig) -> list[str]:
    """Fields a serving request carries: the two domain fields, then the features."""
    return domain_fields(cfg) + [f.name for f in cfg.features]


def sample_columns(cfg: PipelineConfig) -> list[str]:
    """Every column of the samples dataset the loader reads: features, domains, labels."""
    return [*feature_columns(cfg), *DOMAIN_COLUMNS, *LABEL_COLUMNS]


TS = "ts"  # the impression's time (UTC)


def sample_id_column(cfg: PipelineConfig) -> str:
    """The samples' id column as the Spark job writes it: the impressions log's id field.

    Equal to :data:`ID_COLUMN` under the shipped config; readers that hold a config
    should use this, since ``logs.impressions.id_field`` may name another field.
    """
    return cfg.logs["impressions"].id_field
