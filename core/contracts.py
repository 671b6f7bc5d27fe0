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


# --- names the config refers to (checked at load by core.config; torch-free) ---------

# The model zoo's keys (training.models registers exactly these; tests/test_baselines.py
# holds that). Here, not in mmn, so the config can check ``model.kind`` at load without
# importing torch or the application layer; mmn.model_kinds re-exports it.
MODEL_KINDS: tuple[str, ...] = (
    "mmn", "mmn_paper", "mmn_common_only", "mmn_no_dynamic_weight", "dnn",
    # Baselines of the MMN paper's comparison (mmn/compare.py).
    "esmm", "mmoe_type", "mmoe_scen", "ple_type", "ple_scen", "mt_fwfm", "star",
    "dpg_full", "dpg_rowcol", "dpg_row", "dpg_col", "mi_dpg",
)

# Holdout metrics of training.metrics a challenger can be ranked by (gate.metric,
# ssim.ratio_metric): AUCs only, since both pick the higher value; loglosses and counts are
# logged too but lower (or no) values are better there. tests/test_config.py checks these
# against what the evaluator produces.
# The per-domain CVR AUC averaged over domains with >= evaluation.min_domain_conversions
# holdout conversions: the average not dominated by noise from near-empty domains.
OBSERVED_AVG = "cvr_auc_domain_avg_observed"
RANKING_METRICS: tuple[str, ...] = (
    "cvr_auc", "cvr_auc_type_avg", "cvr_auc_scenario_avg", "cvr_auc_domain_avg",
    OBSERVED_AVG, "ctr_auc", "ctcvr_auc",
)
# Per-domain CVR AUCs, named by vocabulary value: cvr_auc_type/<type>,
# cvr_auc_scenario/<scenario>, cvr_auc_domain/<type>/<scenario>.
RANKING_METRIC_PATTERN = r"cvr_auc_(type|scenario)/[^/\s]+|cvr_auc_domain/[^/\s]+/[^/\s]+"


def is_ranking_metric(name: str) -> bool:
    """Is ``name`` a holdout metric the evaluator logs and a higher value of which is better?"""
    import re

    return name in RANKING_METRICS or re.fullmatch(RANKING_METRIC_PATTERN, name) is not None
