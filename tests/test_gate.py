"""The holdout gate's rules, and alias moves in a real MLflow registry (SQLite store)."""

from __future__ import annotations

import dataclasses

import mlflow
import pytest
from mlflow import MlflowClient

from core.config import load_config
from serving.registry import (
    CHAMPION,
    PREVIOUS,
    alias_version,
    decide,
    promote,
    recheck,
    record_decision,
    register,
    rollback,
    settle,
    write_gate_report,
)

GATE = dataclasses.replace(
    load_config(environ={}).gate, metric="cvr_auc_domain_avg", min_delta=0.001, floor=0.6,
    min_domain_conversions=30, domain_drop_tolerance=0.02,
)
CONVERSIONS = {"cvr_auc_type/purchase": 100, "cvr_auc_type/form": 5, "cvr_auc_scenario/banner": 80}


def metrics(avg, purchase=0.7, form=0.7, banner=0.7):
    return {"cvr_auc_domain_avg": avg, "cvr_auc_type/purchase": purchase,
            "cvr_auc_type/form": form, "cvr_auc_scenario/banner": banner}


def test_first_model_promoted_when_it_clears_the_floor():
    assert decide(GATE, metrics(0.65), None, CONVERSIONS).promote
    low = decide(GATE, metrics(0.55), None, CONVERSIONS)
    assert not low.promote and "floor" in low.reason


def test_challenger_must_beat_champion_by_min_delta():
    same = decide(GATE, metrics(0.7000), metrics(0.7000), CONVERSIONS, champion_version="3")
    assert not same.promote and "min_delta" in same.reason
    assert decide(GATE, metrics(0.7020), metrics(0.7000), CONVERSIONS).promote


def test_guarded_domain_drop_blocks_promotion_but_small_domains_do_not():
    dropped = decide(GATE, metrics(0.72, purchase=0.60), metrics(0.70, purchase=0.70), CONVERSIONS)
    assert not dropped.promote and "cvr_auc_type/purchase" in dropped.reason
    # 'form' has 5 holdout conversions (< 30): its drop is shown but does not block.
    small = decide(GATE, metrics(0.72, form=0.40), metrics(0.70, form=0.70), CONVERSIONS)
    assert small.promote
    assert {d.metric: d.guarded for d in small.domains}["cvr_auc_type/form"] is False


def test_undefined_challenger_metric_is_rejected_not_crashed():
    decision = decide(GATE, {"cvr_auc_domain_avg": None}, None, {})
    assert not decision.promote and "undefined" in decision.reason


def test_report_has_markdown_and_json(tmp_path):
    decision = decide(GATE, metrics(0.72), metrics(0.70), CONVERSIONS, champion_version="1")
    md, js = write_gate_report(decision, tmp_path)
    assert "PROMOTED" in md.read_text() and "cvr_auc_type/purchase" in md.read_text()
    assert '"promote": true' in js.read_text()


@pytest.fixture
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.create_experiment("gate-test", artifact_location=(tmp_path / "art").as_uri())
    client = MlflowClient(uri, uri)
    versions = []
    for _ in range(3):
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_text("weights", "model/weights.txt")
            versions.append(register(client, "m", f"runs:/{run.info.run_id}/model", run.info.run_id, {}))
    return client, versions


def test_promote_keeps_previous_and_rollback_swaps(registry):
    client, (v1, v2, v3) = registry
    assert promote(client, "m", v1) is None
    assert promote(client, "m", v2) == v1
    assert alias_version(client, "m", CHAMPION) == v2
    assert alias_version(client, "m", PREVIOUS) == v1
    restored, demoted = rollback(client, "m")
    assert (restored, demoted) == (v1, v2)
    assert alias_version(client, "m", CHAMPION) == v1
    assert client.get_model_version("m", v2).tags["status"] == "rolled_back"


def test_rejected_version_stays_registered_with_reason(registry):
    client, (v1, v2, _) = registry
    promote(client, "m", v1)
    decision = decide(GATE, metrics(0.60), metrics(0.70), CONVERSIONS, champion_version=v1)
    record_decision(client, "m", v2, decision)
    tags = client.get_model_version("m", v2).tags
    assert tags["status"] == "rejected" and tags["gate.decision"] == "rejected"
    assert "floor" in tags["gate.reason"] or "min_delta" in tags["gate.reason"]
    assert alias_version(client, "m", CHAMPION) == v1


def test_rollback_without_previous_is_a_clear_error(registry):
    client, (v1, _, _) = registry
    promote(client, "m", v1)
    with pytest.raises(RuntimeError, match="no 'previous'"):
        rollback(client, "m")


def test_recheck_refuses_a_promotion_compared_against_another_champion():
    decision = decide(GATE, metrics(0.72), metrics(0.70), CONVERSIONS, champion_version="1")
    stale = recheck(decision, "2")
    assert not stale.promote and stale.stale and stale.label == "refused"
    assert "compared against v1, the champion is now v2" in stale.reason
    assert "REFUSED" in stale.to_markdown()
    first = recheck(decide(GATE, metrics(0.65), None, CONVERSIONS), "4")
    assert not first.promote and "compared against no champion" in first.reason
    current = recheck(decision, "1")
    assert current.promote and not current.stale and current.champion_at_move == "1"


def test_recheck_leaves_a_rejection_a_rejection():
    rejected = decide(GATE, metrics(0.60), metrics(0.70), CONVERSIONS, champion_version="1")
    checked = recheck(rejected, "2")
    assert not checked.promote and checked.label == "rejected" and checked.reason == rejected.reason
    assert checked.champion_at_move == "2"


def test_settle_moves_the_alias_only_over_the_compared_champion(registry):
    client, (v1, v2, v3) = registry
    promote(client, "m", v1)
    compared_v1 = decide(GATE, metrics(0.72), metrics(0.70), CONVERSIONS, champion_version=v1)
    assert settle(client, "m", v2, compared_v1).promote
    assert settle(client, "m", v3, compared_v1).label == "refused"
    assert alias_version(client, "m", CHAMPION) == v2
    tags = client.get_model_version("m", v3).tags
    assert tags["status"] == "refused" and tags["gate.champion_version_at_move"] == v2
