"""Gate and promote: apply the holdout gate to an evaluated run and move ``champion``.

Kept in its own module so the decision and the alias move can evolve without touching the
other task functions (see mmn.tasks for the step list).

The decision is computed from the logged evaluation, but it is applied in one guarded step
(serving.registry.register_and_settle): under the registry lock, the alias moves only if the
champion is still the version the evaluation compared against. A stale comparison is refused,
not re-scored: the evaluation is a full prediction pass of two models over the holdout, which
would hold the lock for minutes and needs the day's samples at hand, while a refusal is cheap,
keeps the record equal to what was compared, and is settled by re-running evaluate and gate.
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
    """Apply the holdout gate; register the version and move ``champion`` when it passes.

    The move is guarded: it happens only if the champion is still the one the evaluation
    compared against (else the decision is recorded as refused, with both versions).
    """
    import dataclasses
    import tempfile

    from serving.registry import client_for, decide, lock_for, register_and_settle, write_gate_report

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
    if not dry_run:
        model_uri = client.get_run(run_id).data.tags["model_uri"]
        version, decision = register_and_settle(
            client, name, decision, model_uri=model_uri, run_id=run_id,
            tags={"data_date": day, "run_id": run_id}, lock=lock_for(cfg),
        )
    # The run records the decision as applied (after the guarded step), through the client
    # so that concurrent gates in one process don't share MLflow's active-run state.
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_gate_report(decision, Path(tmp)):
            client.log_artifact(run_id, str(path), artifact_path="gate")
    outcome = "dry_run" if dry_run else decision.label
    for key, value in {
        "gate.decision": outcome,
        "gate.reason": decision.reason[:4900],
        "gate.champion_version": decision.champion_version or "",
        "gate.champion_version_at_move": decision.champion_at_move or "",
    }.items():
        client.set_tag(run_id, key, value)
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
        "champion_version_at_move": decision.champion_at_move,
        "run_id": run_id,
    }
    # One file per gate (two gates of one day each keep their record) and the day's latest,
    # each replaced whole so a concurrent reader never sees half of one.
    text = json.dumps(summary, indent=1, default=str)
    gate_dir = cfg.paths.reports_root / "gate"
    for path in (gate_dir / "runs" / f"{run_id}.json", gate_dir / f"{day}.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.with_name(f".{path.name}.{run_id}.tmp")
        tmp_path.write_text(text)
        tmp_path.replace(path)
    if not dry_run:
        from mmn.tracking import record_gate

        record_gate(cfg, summary)  # the run's and the version's descriptions, every caller alike
    return summary
