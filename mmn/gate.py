"""Gate and promote: apply the holdout gate to an evaluated run and move ``champion``.

Kept in its own module so the decision and the alias move can evolve without touching the
other task functions (see mmn.tasks for the step list).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from core.config import PipelineConfig
from mmn.tracking import setup_mlflow

log = logging.getLogger(__name__)


def gate_day(
    cfg: PipelineConfig,
    day: str,
    run_id: str,
    evaluation: dict[str, Any],
    *,
    dry_run: bool = False,
    min_delta: float | None = None,
    floor: float | None = None,
) -> dict[str, Any]:
    """Apply the holdout gate; register the version and move ``champion`` when it passes."""
    import dataclasses
    import tempfile

    import mlflow

    from serving.registry import client_for, decide, promote, record_decision, register, write_gate_report

    gate = dataclasses.replace(
        cfg.gate,
        min_delta=cfg.gate.min_delta if min_delta is None else float(min_delta),
        floor=cfg.gate.floor if floor is None else float(floor),
    )
    decision = decide(
        gate, evaluation["challenger"], evaluation["champion"], evaluation["conversions"],
        champion_version=evaluation["champion_version"],
    )
    setup_mlflow(cfg)
    client = client_for(cfg)
    name = cfg.mlflow.registered_model
    version = None
    with mlflow.start_run(run_id=run_id):
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_gate_report(decision, Path(tmp)):
                mlflow.log_artifact(str(path), artifact_path="gate")
        mlflow.set_tags({
            "gate.decision": ("promoted" if decision.promote else "rejected") if not dry_run else "dry_run",
            "gate.reason": decision.reason[:4900],
        })
    if not dry_run:
        model_uri = client.get_run(run_id).data.tags["model_uri"]
        version = register(client, name, model_uri, run_id, {"data_date": day, "run_id": run_id})
        record_decision(client, name, version, decision)
        if decision.promote:
            promote(client, name, version)
    outcome = "dry_run" if dry_run else ("promoted" if decision.promote else "rejected")
    log.info("gate for %s: %s (%s)", day, outcome, decision.reason)
    summary = {
        "day": day,
        "decision": outcome,
        "would_promote": decision.promote,
        "reason": decision.reason,
        "version": version,
        "metric": decision.metric,
        "challenger": decision.challenger_score,
        "champion": decision.champion_score,
        "champion_version": decision.champion_version,
        "run_id": run_id,
    }
    summary_path = cfg.paths.reports_root / "gate" / f"{day}.json"
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1, default=str))
    return summary
