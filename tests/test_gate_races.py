"""Gate races: the comparison and the alias move are one guarded step (issue 17, item 1).

Real MLflow registry (SQLite store) and the real gate_day; the models are stand-in runs
(a text artifact, like tests/test_gate.py) and the evaluations are what `mmn evaluate`
logs for them: model A scores 0.70 and model B 0.615 on the same holdout, both evaluated
before either gate runs, so both compared against the same champion.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from core.config import REPO_ROOT, load_config
from mmn.gate import gate_day
from mmn.tracking import setup_mlflow
from serving.registry import (
    CHAMPION,
    PREVIOUS,
    advisory_key,
    alias_version,
    decide,
    lock_for,
    plan_registry_lock,
    register_and_settle,
    registry_lock,
    rollback,
)

DAY = "2026-11-10"
METRIC = "cvr_auc_type_avg"


@pytest.fixture
def cfg(tmp_path):
    return load_config(overrides={
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow.artifact_root": str(tmp_path / "artifacts"),
        "mlflow.registered_model": "cvr",
        "paths.reports_root": str(tmp_path / "reports"),
        "gate.metric": METRIC,
        "gate.floor": 0.55,
        "gate.min_delta": 0.0,
    })


def _client(cfg) -> MlflowClient:
    uri = cfg.mlflow.tracking_uri
    return MlflowClient(uri, uri)


def _train(cfg, label: str) -> str:
    """A finished training run as gate_day sees it: a logged model and its model_uri tag."""
    exp = setup_mlflow(cfg)
    client = _client(cfg)
    run = client.create_run(exp, run_name=label)
    client.set_tag(run.info.run_id, "model_uri", f"runs:/{run.info.run_id}/model")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _evaluation(run_id: str, score: float, champion: tuple[str, float] | None) -> dict:
    """What evaluate_day returns (and logs) for a challenger scored next to ``champion``."""
    return {
        "day": DAY, "run_id": run_id, "holdout": "day",
        "challenger": {METRIC: score},
        "champion": {METRIC: champion[1]} if champion else None,
        "champion_version": champion[0] if champion else None,
        "champion_note": "scored on the same holdout" if champion else "no champion yet",
        "conversions": {},
    }


def _seed_champion(cfg, score: float, over: tuple[str, float] | None = None) -> tuple[str, float]:
    """A champion already serving before A and B are evaluated (gated over ``over``)."""
    run_id = _train(cfg, "incumbent")
    summary = gate_day(cfg, DAY, run_id, _evaluation(run_id, score, over))
    assert summary["decision"] == "promoted"
    return summary["version"], score


def _tags(cfg, version: str) -> dict[str, str]:
    return _client(cfg).get_model_version(cfg.mlflow.registered_model, version).tags


@pytest.mark.parametrize("incumbent", [None, 0.60], ids=["first-models", "over-a-champion"])
def test_better_then_worse_ends_on_the_better(cfg, incumbent):
    champion = _seed_champion(cfg, incumbent) if incumbent is not None else None
    run_a, run_b = _train(cfg, "A"), _train(cfg, "B")
    eval_a = _evaluation(run_a, 0.70, champion)  # both evaluated before either gate runs
    eval_b = _evaluation(run_b, 0.615, champion)

    a = gate_day(cfg, DAY, run_a, eval_a)
    b = gate_day(cfg, DAY, run_b, eval_b)

    name = cfg.mlflow.registered_model
    assert a["decision"] == "promoted"
    assert alias_version(_client(cfg), name, CHAMPION) == a["version"]
    assert b["decision"] == "refused" and not b["would_promote"]
    assert b["champion_version"] == (champion[0] if champion else None)
    assert b["champion_version_at_move"] == a["version"]
    # The refusal is on the version, the run and the report, naming both versions.
    tags = _tags(cfg, b["version"])
    assert tags["gate.decision"] == "refused" and tags["status"] == "refused"
    assert f"the champion is now v{a['version']}" in tags["gate.reason"]
    assert tags["gate.champion_version_at_move"] == a["version"]
    run_tags = _client(cfg).get_run(run_b).data.tags
    assert run_tags["gate.decision"] == "refused" and "champion moved" in run_tags["gate.reason"]
    report = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run_b, artifact_path="gate/gate_report.json", tracking_uri=cfg.mlflow.tracking_uri,
    )).read_text())
    assert report["stale"] is True and report["champion_at_move"] == a["version"]


def test_concurrent_gates_apply_exactly_one_decision(cfg):
    champion = _seed_champion(cfg, 0.60)
    runs = {"A": _train(cfg, "A"), "B": _train(cfg, "B")}
    evals = {"A": _evaluation(runs["A"], 0.70, champion),
             "B": _evaluation(runs["B"], 0.615, champion)}
    start = threading.Barrier(2)
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def gate(label: str) -> None:
        try:
            start.wait()
            results[label] = gate_day(cfg, DAY, runs[label], evals[label])
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=gate, args=(label,)) for label in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    decisions = sorted(r["decision"] for r in results.values())
    assert decisions == ["promoted", "refused"]
    winner = next(r for r in results.values() if r["decision"] == "promoted")
    loser = next(r for r in results.values() if r["decision"] == "refused")
    name = cfg.mlflow.registered_model
    client = _client(cfg)
    assert alias_version(client, name, CHAMPION) == winner["version"]
    assert alias_version(client, name, PREVIOUS) == champion[0]
    # Both compared against the same champion; the loser says which version beat it to the move.
    assert winner["champion_version"] == loser["champion_version"] == champion[0]
    assert winner["champion_version_at_move"] == champion[0]
    assert loser["champion_version_at_move"] == winner["version"]
    assert f"v{winner['version']}" in _tags(cfg, loser["version"])["gate.reason"]
    assert _tags(cfg, winner["version"])["gate.decision"] == "promoted"
    # Each gate keeps its own summary, whoever wrote the day's file last.
    for result in results.values():
        kept = json.loads((cfg.paths.reports_root / "gate" / "runs" / f"{result['run_id']}.json").read_text())
        assert kept["decision"] == result["decision"]


def test_rollback_after_evaluation_refuses_the_stale_promotion(cfg):
    first = _seed_champion(cfg, 0.60)
    second = _seed_champion(cfg, 0.62, over=first)
    run_a = _train(cfg, "A")
    eval_a = _evaluation(run_a, 0.70, second)
    restored, _ = rollback(_client(cfg), cfg.mlflow.registered_model, lock_for(cfg))
    assert restored == first[0]

    a = gate_day(cfg, DAY, run_a, eval_a)

    assert a["decision"] == "refused"
    assert alias_version(_client(cfg), cfg.mlflow.registered_model, CHAMPION) == first[0]
    assert f"compared against v{second[0]}, the champion is now v{first[0]}" in a["reason"]


def test_dry_run_moves_nothing_and_registers_nothing(cfg):
    champion = _seed_champion(cfg, 0.60)
    run_a = _train(cfg, "A")
    summary = gate_day(cfg, DAY, run_a, _evaluation(run_a, 0.70, champion), dry_run=True)
    assert summary["decision"] == "dry_run" and summary["would_promote"] and summary["version"] is None
    assert alias_version(_client(cfg), cfg.mlflow.registered_model, CHAMPION) == champion[0]


def test_a_held_lock_times_out_without_registering(cfg):
    run_a = _train(cfg, "A")
    decision = decide(cfg.gate, {METRIC: 0.70}, None, {})
    client, name = _client(cfg), cfg.mlflow.registered_model
    with registry_lock(lock_for(cfg)):
        with pytest.raises(TimeoutError, match="registry lock"):
            register_and_settle(client, name, decision, model_uri=f"runs:/{run_a}/model",
                                run_id=run_a, tags={}, lock=lock_for(cfg), timeout_s=0.3)
    assert client.search_model_versions(f"name='{name}'") == []
    version, final = register_and_settle(client, name, decision, model_uri=f"runs:/{run_a}/model",
                                         run_id=run_a, tags={}, lock=lock_for(cfg), timeout_s=5)
    assert final.promote and alias_version(client, name, CHAMPION) == version


HOLDER = """
import sys
from serving.registry import plan_registry_lock, registry_lock
plan = plan_registry_lock(sys.argv[1], "cvr")
with registry_lock(plan, timeout_s=30):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_the_lock_excludes_another_process_and_dies_with_it(cfg):
    """Another process holding the lock blocks this one; SIGKILLed, it leaves no stale lock."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, cfg.mlflow.tracking_uri],
                              cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match="another gate or rollback holds it"):
            with registry_lock(lock_for(cfg), timeout_s=0.3):
                pass
    finally:
        holder.kill()  # a gate killed mid-move: the kernel drops its flock with the process
        holder.wait(timeout=60)
    started = time.monotonic()
    with registry_lock(lock_for(cfg), timeout_s=10):
        assert time.monotonic() - started < 10


def test_lock_plan_follows_the_store(tmp_path):
    sqlite = plan_registry_lock(f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}", "mmn_cvr")
    assert sqlite.kind == "file" and sqlite.target == str(tmp_path / "db" / "mlflow.db.mmn_cvr.gate.lock")
    pg = plan_registry_lock("postgresql+psycopg2://mlflow:pw@db:5432/mlflow", "mmn_cvr")
    assert pg.kind == "postgres" and pg.key == advisory_key("mmn_cvr") != advisory_key("other")
    assert "pw" not in pg.describe() and "db/mlflow" in pg.describe()
    served = plan_registry_lock("http://mlflow:5000", "mmn_cvr", lock_dir=tmp_path / "locks")
    assert served.target == str(tmp_path / "locks" / "mmn_cvr.gate.lock")
    explicit = plan_registry_lock("http://mlflow:5000", "mmn_cvr",
                                  lock_target="postgresql://mlflow@db/mlflow", lock_dir=tmp_path)
    assert explicit.kind == "postgres"
    store = plan_registry_lock(str(tmp_path / "mlruns"), "mmn_cvr")
    assert store.target == str(tmp_path / "mlruns" / ".mmn_cvr.gate.lock")
