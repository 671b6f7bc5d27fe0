"""MLflow model registry: the holdout AUC gate, champion/previous aliases, rollback.

The gate never lets a worse model replace the champion: a challenger is promoted only when
it clears an absolute floor, beats the champion by ``min_delta`` on the gate metric, and no
conversion type or display scenario with enough holdout conversions drops by more than the
tolerance. Every decision is written to the model version's tags and to a gate report.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from core.config import Gate, PipelineConfig

CHAMPION = "champion"
PREVIOUS = "previous"
DOMAIN_METRIC_PREFIXES = ("cvr_auc_type/", "cvr_auc_scenario/")


@dataclass
class DomainComparison:
    metric: str
    conversions: int
    challenger: float | None
    champion: float | None
    guarded: bool

    @property
    def delta(self) -> float | None:
        if self.challenger is None or self.champion is None:
            return None
        return self.challenger - self.champion


@dataclass
class GateDecision:
    promote: bool
    reason: str
    metric: str
    challenger_score: float | None
    champion_score: float | None
    champion_version: str | None
    thresholds: dict[str, float]
    domains: list[DomainComparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, comparison in zip(data["domains"], self.domains, strict=True):
            row["delta"] = comparison.delta
        return data

    def to_markdown(self) -> str:
        verdict = "PROMOTED" if self.promote else "REJECTED"
        lines = [
            f"# Gate decision: {verdict}",
            "",
            f"**Reason:** {self.reason}",
            "",
            f"| | {self.metric} |",
            "|---|---|",
            f"| challenger | {_fmt(self.challenger_score)} |",
            f"| champion (v{self.champion_version or '-'}) | {_fmt(self.champion_score)} |",
            "",
            "Thresholds: " + ", ".join(f"{k}={v}" for k, v in self.thresholds.items()),
            "",
            "| domain metric | holdout conversions | challenger | champion | delta | guarded |",
            "|---|---:|---:|---:|---:|:-:|",
        ]
        for d in self.domains:
            lines.append(
                f"| {d.metric} | {d.conversions} | {_fmt(d.challenger)} | {_fmt(d.champion)} "
                f"| {_fmt(d.delta, signed=True)} | {'yes' if d.guarded else ''} |"
            )
        return "\n".join(lines) + "\n"


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def compare_domains(
    gate: Gate,
    challenger: Mapping[str, float | None],
    champion: Mapping[str, float | None],
    conversions: Mapping[str, int],
) -> list[DomainComparison]:
    """Per conversion type and per scenario CVR AUC, side by side, with the guard flag."""
    names = sorted(
        k for k in set(challenger) | set(champion) if k.startswith(DOMAIN_METRIC_PREFIXES)
    )
    return [
        DomainComparison(
            metric=name,
            conversions=int(conversions.get(name, 0)),
            challenger=challenger.get(name),
            champion=champion.get(name),
            guarded=int(conversions.get(name, 0)) >= gate.min_domain_conversions,
        )
        for name in names
    ]


def decide(
    gate: Gate,
    challenger: Mapping[str, float | None],
    champion: Mapping[str, float | None] | None,
    conversions: Mapping[str, int],
    champion_version: str | None = None,
) -> GateDecision:
    """Apply the gate rules; ``champion`` is None when there is no comparable champion."""
    score = challenger.get(gate.metric)
    champ_score = champion.get(gate.metric) if champion else None
    domains = compare_domains(gate, challenger, champion or {}, conversions)
    thresholds = {
        "floor": gate.floor,
        "min_delta": gate.min_delta,
        "domain_drop_tolerance": gate.domain_drop_tolerance,
        "min_domain_conversions": gate.min_domain_conversions,
    }

    def verdict(promote: bool, reason: str) -> GateDecision:
        return GateDecision(promote, reason, gate.metric, score, champ_score,
                            champion_version, thresholds, domains)

    if score is None:
        return verdict(False, f"challenger {gate.metric} is undefined on the holdout")
    if score < gate.floor:
        return verdict(False, f"challenger {gate.metric}={score:.4f} is below the floor {gate.floor}")
    if champion is None or champ_score is None:
        return verdict(True, f"no comparable champion; challenger clears the floor {gate.floor}")
    if score < champ_score + gate.min_delta:
        return verdict(
            False,
            f"challenger {gate.metric}={score:.4f} < champion {champ_score:.4f} "
            f"+ min_delta {gate.min_delta}",
        )
    dropped = [
        d for d in domains
        if d.guarded and d.delta is not None and d.delta < -gate.domain_drop_tolerance
    ]
    if dropped:
        listed = ", ".join(f"{d.metric} ({d.delta:+.4f})" for d in dropped)
        return verdict(
            False, f"guarded domains drop by more than {gate.domain_drop_tolerance}: {listed}"
        )
    return verdict(
        True, f"challenger {gate.metric}={score:.4f} >= champion {champ_score:.4f} + {gate.min_delta}"
    )


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the model or alias doesn't exist."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def register(client: MlflowClient, name: str, model_uri: str, run_id: str, tags: Mapping[str, str]) -> str:
    """Register a logged model as a new version of ``name`` and return its version."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="MMN CVR model for every conversion type x display scenario."
        )
    version = client.create_model_version(name, model_uri, run_id=run_id, tags=dict(tags))
    return str(version.version)


def record_decision(client: MlflowClient, name: str, version: str, decision: GateDecision) -> None:
    """Write the decision onto the version's tags, readable in the registry UI."""
    tags = {
        "gate.decision": "promoted" if decision.promote else "rejected",
        "gate.reason": decision.reason[:4900],
        "gate.metric": decision.metric,
        "gate.challenger_score": _fmt(decision.challenger_score),
        "gate.champion_score": _fmt(decision.champion_score),
        "gate.champion_version": decision.champion_version or "",
        "gate.domains": json.dumps(
            {d.metric: d.delta for d in decision.domains if d.guarded}, default=str
        )[:4900],
        "status": CHAMPION if decision.promote else "rejected",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def promote(client: MlflowClient, name: str, version: str) -> str | None:
    """Point ``champion`` at ``version`` (one call); the former champion becomes ``previous``."""
    former = alias_version(client, name, CHAMPION)
    if former is not None and former != version:
        client.set_registered_model_alias(name, PREVIOUS, former)
        client.set_model_version_tag(name, former, "status", PREVIOUS)
    client.set_registered_model_alias(name, CHAMPION, version)
    return former


def rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    """Swap ``champion`` and ``previous``; returns (restored, demoted) versions."""
    restored = alias_version(client, name, PREVIOUS)
    demoted = alias_version(client, name, CHAMPION)
    if restored is None or demoted is None:
        raise RuntimeError(f"model {name!r} has no {PREVIOUS!r} version to roll back to")
    client.set_registered_model_alias(name, CHAMPION, restored)
    client.set_registered_model_alias(name, PREVIOUS, demoted)
    client.set_model_version_tag(name, restored, "status", CHAMPION)
    client.set_model_version_tag(name, demoted, "status", "rolled_back")
    return restored, demoted


def write_gate_report(decision: GateDecision, out_dir: Path) -> list[Path]:
    """Gate report as Markdown (for people) and JSON (for tools)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "gate_report.md", out_dir / "gate_report.json"
    md.write_text(decision.to_markdown())
    js.write_text(json.dumps(decision.to_dict(), indent=1, default=str))
    return [md, js]


def client_for(cfg: PipelineConfig) -> MlflowClient:
    import mlflow

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_registry_uri(cfg.mlflow.tracking_uri)
    return MlflowClient(tracking_uri=cfg.mlflow.tracking_uri, registry_uri=cfg.mlflow.tracking_uri)
