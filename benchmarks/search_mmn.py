"""Why MMN trails, measured on a validation day: a one-at-a-time ablation, then Optuna.

Every configuration trains MMN through the daily pipeline's own steps (``train_day`` +
``evaluate_day``) for the VALIDATION day (its training window: the days before it) and is
scored on that day's holdout; the holdout day of the accuracy study (the day after) is
never looked at here, so the setting chosen is reported on days it was not chosen on.
Each configuration is a nested MLflow run under one parent run of the experiment
``mmn_search`` (tags ``search_stage`` = ablation | optuna), with its overrides as params.

Objective: the well-observed per-domain average CVR AUC (``cvr_auc_domain_avg_observed``:
domains with >= evaluation.min_domain_conversions holdout conversions), the average the
study reports.

    PYTHONPATH=. python benchmarks/search_mmn.py --preset multidomain --impressions 300000 \\
        --trials 12 --out /tmp/bench/study --json /tmp/bench/study/search.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_accuracy import prepare_days, study_days

OBJECTIVE = "cvr_auc_domain_avg_observed"
EXPERIMENT = "mmn_search"

# One change at a time from the pipeline's configuration at the start of the study.
ABLATIONS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "no_dynamic_weight": {"model.dynamic_weight": False},
    "domain_lr_1.0": {"training.domain_lr_scale": 1.0},
    "direct_cvr_loss_1.0": {"model.cvr_loss_weight": 1.0},
    "adam_1e-3": {"training.optimizer": "adam", "training.learning_rate": 0.001},
    "domain_l2_1e-4": {"training.domain_weight_decay": 1e-4},
    "epochs_1": {"training.epochs": 1},
    "narrow_towers": {"model.ctr_hidden": [128, 64], "model.cvr_hidden": [128, 64]},
    "embedding_16": {"model.embedding_dim": 16},
    # The single-axis winners together (Optuna's first trial), then with the wide term.
    "combined": {"model.dynamic_weight": False, "model.cvr_loss_weight": 1.0,
                 "training.domain_lr_scale": 1.0},
    "combined_wide": {"model.dynamic_weight": False, "model.cvr_loss_weight": 1.0,
                      "training.domain_lr_scale": 1.0, "model.wide": True},
    "combined_wide_medium": {"model.dynamic_weight": False, "model.cvr_loss_weight": 1.0,
                             "training.domain_lr_scale": 1.0, "model.wide": True,
                             "model.ctr_hidden": [256, 128], "model.cvr_hidden": [256, 128]},
}
# Regularization of the shared parameters (embedding tables included), from the new defaults.
for _decay in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1):
    ABLATIONS[f"shared_l2_{_decay:g}"] = {"training.shared_weight_decay": _decay}
# Round two, one change at a time from the defaults with the shared L2 (0.01).
ABLATIONS.update({
    "l2_epochs_1": {"training.epochs": 1},
    "l2_epochs_5": {"training.epochs": 5},
    "l2_lr_0.005": {"training.learning_rate": 0.005},
    "l2_lr_0.02": {"training.learning_rate": 0.02},
    "l2_domain_l2_1e-3": {"training.domain_weight_decay": 1e-3},
    "l2_domain_l2_1e-2": {"training.domain_weight_decay": 1e-2},
    "l2_domain_lr_3.0": {"training.domain_lr_scale": 3.0},
    "l2_embedding_16": {"model.embedding_dim": 16},
    "l2_batch_4096": {"training.batch_size": 4096},
    "l2_no_wide": {"model.wide": False},
    # The wide term on fewer fields: the ids' effects left to the shared embeddings, which
    # the CTR task trains on every impression (the wide term learns from clicked rows only).
    "wide_no_user": {"model.wide_fields": ["ad_id", "advertiser_id", "ad_category", "device_os",
                                           "user_age", "bid_price"]},
    "wide_mid_card": {"model.wide_fields": ["advertiser_id", "ad_category", "device_os", "user_age",
                                            "bid_price"]},
    "wide_low_card": {"model.wide_fields": ["ad_category", "device_os", "user_age", "bid_price"]},
    # Larger batches (round two's one gain), with the learning rate scaled or the wide term narrowed.
    "batch_4096_lr_0.02": {"training.batch_size": 4096, "training.learning_rate": 0.02},
    "batch_8192": {"training.batch_size": 8192},
    "batch_4096_lr_0.03": {"training.batch_size": 4096, "training.learning_rate": 0.03},
    "batch_8192_lr_0.03": {"training.batch_size": 8192, "training.learning_rate": 0.03},
    # The candidate default: validation every 50 steps keeps the cadence in samples of 200
    # steps at batch 1024 (early stopping and the best-state pick see the same granularity).
    "batch_4096_lr_0.02_eval_50": {"training.batch_size": 4096, "training.learning_rate": 0.02,
                                   "training.eval_every_steps": 50},
    "batch_4096_wide_mid_card": {"training.batch_size": 4096,
                                 "model.wide_fields": ["advertiser_id", "ad_category", "device_os",
                                                       "user_age", "bid_price"]},
})
# The default ablation: every axis the issue names that a single run can move.
DEFAULT_ABLATION = ("baseline", "no_dynamic_weight", "domain_lr_1.0", "direct_cvr_loss_1.0",
                    "adam_1e-3", "epochs_1", "narrow_towers")
TOWERS = {"narrow": [128, 64], "medium": [256, 128], "paper": [512, 256, 128, 128]}


def suggest(trial: Any) -> dict[str, Any]:
    """The search space: the ablation's axes, jointly (narrow towers left out: the ablation
    measured them 0.05 below the paper's at the same steps)."""
    optimizer = trial.suggest_categorical("optimizer", ["adagrad", "adam"])
    lr_range = (0.005, 0.05) if optimizer == "adagrad" else (3e-4, 3e-3)
    towers = TOWERS[trial.suggest_categorical("towers", ["medium", "paper"])]
    return {
        "training.optimizer": optimizer,
        "training.learning_rate": trial.suggest_float("learning_rate", *lr_range, log=True),
        "training.domain_lr_scale": trial.suggest_float("domain_lr_scale", 0.1, 3.0, log=True),
        "training.domain_weight_decay": trial.suggest_categorical("domain_weight_decay", [0.0, 1e-5, 1e-4]),
        "training.epochs": trial.suggest_int("epochs", 2, 4),
        "model.dynamic_weight": trial.suggest_categorical("dynamic_weight", [True, False]),
        "model.cvr_loss_weight": trial.suggest_categorical("cvr_loss_weight", [0.5, 1.0, 2.0]),
        "model.embedding_dim": trial.suggest_categorical("embedding_dim", [10, 16]),
        "model.ctr_hidden": towers,
        "model.cvr_hidden": towers,
    }


# The first trial: the ablation's winners combined (the sampler explores from there).
FIRST_TRIAL = {"optimizer": "adagrad", "learning_rate": 0.01, "domain_lr_scale": 1.0,
               "domain_weight_decay": 0.0, "epochs": 3, "dynamic_weight": False,
               "cvr_loss_weight": 1.0, "embedding_dim": 10, "towers": "paper"}


def evaluate_config(cfg: Any, day: str, overrides: dict[str, Any], *, stage: str, name: str,
                    parent_id: str) -> dict[str, Any]:
    """Train MMN with ``overrides`` for ``day`` and score its holdout; one nested run."""
    from mmn.tasks import evaluate_day, train_day

    trial_cfg = cfg.with_overrides({**overrides, "mlflow.experiment": EXPERIMENT})
    began = time.monotonic()
    run_id = train_day(trial_cfg, day, model_kind="mmn", experiment=EXPERIMENT, parent_run_id=parent_id,
                       extra_tags={"search_stage": stage, "search_config": name,
                                   "search_overrides": json.dumps(overrides, sort_keys=True)})
    metrics = evaluate_day(trial_cfg, day, run_id)["challenger"]
    row = {"stage": stage, "name": name, "overrides": overrides, "run_id": run_id,
           "seconds": time.monotonic() - began,
           **{k: metrics.get(k) for k in (OBJECTIVE, "cvr_auc_domain_avg", "cvr_auc_type_avg", "cvr_auc")}}
    logging.getLogger("search").info("%s %s: %s = %s (%.0f s)", stage, name, OBJECTIVE,
                                     row[OBJECTIVE], row["seconds"])
    return row


def main() -> None:
    import mlflow
    import optuna

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="multidomain")
    parser.add_argument("--impressions", type=int, default=300_000)
    parser.add_argument("--train-days", type=int, default=3)
    parser.add_argument("--start", default="2026-11-01")
    parser.add_argument("--data-seed", type=int, default=7)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--ablation", default=",".join(DEFAULT_ABLATION),
                        help=f"ablation names ('' for none) of {sorted(ABLATIONS)}")
    parser.add_argument("--sampler-seed", type=int, default=0)
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL (e.g. sqlite:///search.db): processes sharing it "
                             "run trials of one study in parallel")
    parser.add_argument("--study-name", default="mmn_search")
    parser.add_argument("--out", default="/tmp/bench/study")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("mlflow", "alembic", "py4j", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    # Days: train window + validation day + the study's holdout day (built, never scored here).
    days = study_days(args.start, args.train_days + 2)
    validation_day = days[-2]
    cfg = prepare_days(Path(args.out) / args.preset, args.preset, args.impressions, days, args.data_seed,
                       [f"windows.train_window_days={args.train_days}", *args.set])
    from mmn.tasks import setup_mlflow

    setup_mlflow(cfg, EXPERIMENT)
    rows: list[dict[str, Any]] = []

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({"validation_day": validation_day, "rows": rows},
                                                  indent=1, default=str))

    # The parent is created through the client: train_day opens its own (fluent) run.
    client = mlflow.tracking.MlflowClient(cfg.mlflow.tracking_uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parent_id = client.create_run(experiment_id, run_name=f"search {args.preset} {validation_day}",
                                  tags={"validation_day": validation_day, "preset": args.preset}).info.run_id
    status = "FAILED"
    try:
        for name in [n for n in args.ablation.split(",") if n]:
            rows.append(evaluate_config(cfg, validation_day, ABLATIONS[name], stage="ablation",
                                        name=name, parent_id=parent_id))
            save()
        if args.trials > 0:
            study = optuna.create_study(direction="maximize", storage=args.storage,
                                        study_name=args.study_name, load_if_exists=True,
                                        sampler=optuna.samplers.TPESampler(seed=args.sampler_seed))
            if not study.trials:
                study.enqueue_trial(FIRST_TRIAL)

            def objective(trial: optuna.Trial) -> float:
                row = evaluate_config(cfg, validation_day, suggest(trial), stage="optuna",
                                      name=f"trial_{trial.number}", parent_id=parent_id)
                rows.append(row)
                save()
                value = row[OBJECTIVE]
                return float("nan") if value is None else float(value)

            study.optimize(objective, n_trials=args.trials)
            for key, value in study.best_params.items():
                client.log_param(parent_id, f"best.{key}", value)
            client.log_metric(parent_id, f"best_{OBJECTIVE}", study.best_value)
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status=status)
    print(f"{'stage':<9}{'config':<22}{OBJECTIVE:>30}{'domain_avg':>12}{'type_avg':>10}{'seconds':>9}")
    for row in rows:
        def fmt(v: Any) -> str:
            return "n/a" if v is None else f"{v:.4f}"
        print(f"{row['stage']:<9}{row['name']:<22}{fmt(row[OBJECTIVE]):>30}"
              f"{fmt(row['cvr_auc_domain_avg']):>12}{fmt(row['cvr_auc_type_avg']):>10}{row['seconds']:>9.0f}")
        if row["stage"] == "optuna":
            print(f"{'':<31}{json.dumps(row['overrides'], sort_keys=True)}")


if __name__ == "__main__":
    main()
