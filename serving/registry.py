"""MLflow model registry: the holdout AUC gate, champion/previous aliases, rollback.

The gate never lets a worse model replace the champion: a challenger is promoted only when
it clears an absolute floor, beats the champion by ``min_delta`` on the gate metric, and no
conversion type or display scenario with enough holdout conversions drops by more than the
tolerance. Every decision is written to the model version's tags and to a gate report.

A decision is only as good as the champion it was compared against, so the alias move is
one guarded step (``register_and_settle``): under a lock keyed on the registered model, the
champion is read again and the move happens only if it is still the version the decision
compared; otherwise the gate refuses and records why. MLflow has no compare-and-set on
aliases or tags, so the lock lives beside the store (``plan_registry_lock``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from core.config import Gate, PipelineConfig

CHAMPION = "champion"
PREVIOUS = "previous"
DOMAIN_METRIC_PREFIXES = ("cvr_auc_type/", "cvr_auc_scenario/")
# The guarded step is a handful of registry calls; a holder past this is stuck, not busy.
LOCK_TIMEOUT_S = 300.0

log = logging.getLogger(__name__)


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
    # Filled by the guarded step: the champion found under the lock, and whether the
    # decision was refused because that is no longer the version it compared against.
    champion_at_move: str | None = None
    stale: bool = False

    @property
    def label(self) -> str:
        """promoted / rejected (failed the rules) / refused (the comparison went stale)."""
        if self.promote:
            return "promoted"
        return "refused" if self.stale else "rejected"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, comparison in zip(data["domains"], self.domains, strict=True):
            row["delta"] = comparison.delta
        return data

    def to_markdown(self) -> str:
        verdict = {"promoted": "PROMOTED", "rejected": "REJECTED",
                   "refused": "REFUSED (champion moved)"}[self.label]
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
            f"Champion when the alias was to move: v{self.champion_at_move or '-'}",
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
    # A logged model (MLflow 3: models:/<model_id>) is registered with its id: a tracking
    # server refuses that source without it (INVALID_PARAMETER_VALUE); a local store took both.
    ident = model_uri[len("models:/"):].strip("/") if model_uri.startswith("models:/") else ""
    model_id = ident if ident and "/" not in ident and "@" not in ident else None
    version = client.create_model_version(name, model_uri, run_id=run_id, tags=dict(tags), model_id=model_id)
    return str(version.version)


def record_decision(client: MlflowClient, name: str, version: str, decision: GateDecision) -> None:
    """Write the decision onto the version's tags, readable in the registry UI."""
    tags = {
        "gate.decision": decision.label,
        "gate.reason": decision.reason[:4900],
        "gate.metric": decision.metric,
        "gate.challenger_score": _fmt(decision.challenger_score),
        "gate.champion_score": _fmt(decision.champion_score),
        "gate.champion_version": decision.champion_version or "",
        "gate.champion_version_at_move": decision.champion_at_move or "",
        "gate.domains": json.dumps(
            {d.metric: d.delta for d in decision.domains if d.guarded}, default=str
        )[:4900],
        "status": CHAMPION if decision.promote else decision.label,
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


def rollback(client: MlflowClient, name: str, lock: LockPlan | None = None) -> tuple[str, str]:
    """Swap ``champion`` and ``previous``; returns (restored, demoted) versions.

    Takes the registry lock (a gate mid-move must not interleave with the swap); without an
    explicit plan the lock is derived from the client's store (``plan_registry_lock``).
    """
    plan = lock or plan_registry_lock(client.tracking_uri, name)
    with registry_lock(plan):
        restored = alias_version(client, name, PREVIOUS)
        demoted = alias_version(client, name, CHAMPION)
        if restored is None or demoted is None:
            raise RuntimeError(f"model {name!r} has no {PREVIOUS!r} version to roll back to")
        client.set_registered_model_alias(name, CHAMPION, restored)
        client.set_registered_model_alias(name, PREVIOUS, demoted)
        client.set_model_version_tag(name, restored, "status", CHAMPION)
        client.set_model_version_tag(name, demoted, "status", "rolled_back")
    return restored, demoted


# ---------------------------------------------------------------- the guarded step


def recheck(decision: GateDecision, champion_now: str | None) -> GateDecision:
    """A promotion stands only against the champion it was compared with.

    When the champion moved since the evaluation (another gate promoted, or a rollback),
    the challenger was never compared with the version it would replace: refuse, and say
    which version it was compared against and which one holds the alias now.
    """
    checked = dataclasses.replace(decision, champion_at_move=champion_now)
    if not decision.promote or champion_now == decision.champion_version:
        return checked
    compared = f"v{decision.champion_version}" if decision.champion_version else "no champion"
    now = f"v{champion_now}" if champion_now else "no champion"
    return dataclasses.replace(
        checked, promote=False, stale=True,
        reason=(
            f"champion moved since the evaluation: the challenger was compared against "
            f"{compared}, the champion is now {now}; not promoted (would have: "
            f"{decision.reason}). Re-run evaluate and gate to compare against {now}."
        ),
    )


def settle(client: MlflowClient, name: str, version: str, decision: GateDecision) -> GateDecision:
    """Re-read the champion, refuse a stale promotion, record the outcome, move the alias.

    Call only with the registry lock held: the read and the move must see the same champion.
    """
    final = recheck(decision, alias_version(client, name, CHAMPION))
    record_decision(client, name, version, final)
    if final.promote:
        promote(client, name, version)
    return final


def register_and_settle(
    client: MlflowClient,
    name: str,
    decision: GateDecision,
    *,
    model_uri: str,
    run_id: str,
    tags: Mapping[str, str],
    lock: LockPlan,
    timeout_s: float = LOCK_TIMEOUT_S,
) -> tuple[str, GateDecision]:
    """Register the challenger and apply its decision as one step under the registry lock.

    Registering inside the lock too means a gate that times out on the lock leaves no
    version without a decision, and two first-ever gates don't race to create the model.
    """
    with registry_lock(lock, timeout_s):
        version = register(client, name, model_uri, run_id, tags)
        final = settle(client, name, version, decision)
    log.info("gate lock %s: v%s %s (champion compared v%s, at move v%s)", lock.describe(),
             version, final.label, decision.champion_version, final.champion_at_move)
    return version, final


# ---------------------------------------------------------------- the registry lock


@dataclass(frozen=True)
class LockPlan:
    """Where the lock serializing a registered model's alias moves lives.

    ``file``: an exclusive ``flock`` on ``target`` (a path), held by any process that can
    open the file: every gate on the host, or on hosts sharing the folder. ``postgres``: a
    session-level ``pg_advisory_lock(key)`` on the database at ``target`` (a SQLAlchemy
    URI); the server drops it when the holder's connection dies, so a killed gate never
    leaves it held.
    """

    kind: Literal["file", "postgres"]
    target: str
    key: int = 0

    def describe(self) -> str:
        if self.kind == "file":
            return f"file {self.target}"
        parsed = urlparse(self.target)
        where = f"{parsed.hostname or 'localhost'}{parsed.path}"
        return f"pg_advisory_lock({self.key}) on {where}"


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock``, one per registered model."""
    digest = hashlib.blake2b(f"mmn.gate:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def plan_registry_lock(
    registry_uri: str,
    name: str,
    *,
    lock_target: str | None = None,
    lock_dir: Path | None = None,
) -> LockPlan:
    """Choose the lock for ``name`` in the registry at ``registry_uri``.

    - ``lock_target`` wins: a ``postgresql://`` URI (advisory lock on that database) or a
      folder (file lock in it). For an MLflow server, point it at the server's backend DB
      or at storage every gate shares; the server itself offers no atomic primitive.
    - ``sqlite:///path``: a file lock next to the database file, so every process using
      that store excludes every other, whatever its config says about other folders.
    - ``postgresql://``: an advisory lock on the backend database itself.
    - a local file store (path or ``file:``): a file lock inside the store folder.
    - anything else (``http(s)://`` server, ``databricks``): a file lock in ``lock_dir``
      (the gate passes a folder under ``paths.reports_root``, the shared volume in the
      compose deployment); without one, the temp folder, which serializes this host only.
    """
    if lock_target:
        if lock_target.startswith("postgresql"):
            return LockPlan("postgres", lock_target, advisory_key(name))
        return LockPlan("file", str(Path(lock_target) / f"{_safe(name)}.gate.lock"))
    if registry_uri.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        database = make_url(registry_uri).database
        if database and database != ":memory:":
            db = Path(database).resolve()
            return LockPlan("file", str(db.with_name(f"{db.name}.{_safe(name)}.gate.lock")))
    elif registry_uri.startswith("postgresql"):
        return LockPlan("postgres", registry_uri, advisory_key(name))
    else:
        parsed = urlparse(registry_uri)
        if parsed.scheme in ("", "file"):
            store = Path(parsed.path if parsed.scheme else registry_uri).resolve()
            return LockPlan("file", str(store / f".{_safe(name)}.gate.lock"))
    if lock_dir is None:
        lock_dir = Path(tempfile.gettempdir()) / "mmn-registry-locks"
        log.warning("registry %s has no lock of its own and no lock folder was given: "
                    "alias moves are serialized on this host only (%s)", registry_uri, lock_dir)
    return LockPlan("file", str(lock_dir / f"{_safe(name)}.gate.lock"))


@contextmanager
def registry_lock(plan: LockPlan, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[LockPlan]:
    """Hold the lock of ``plan``; TimeoutError (naming the lock) after ``timeout_s``."""
    if plan.kind == "postgres":
        with _advisory_lock(plan, timeout_s):
            yield plan
        return
    from filelock import FileLock, Timeout

    Path(plan.target).parent.mkdir(parents=True, exist_ok=True)
    # A fresh object per acquisition: flock excludes other open files, so threads of one
    # process exclude each other too (one shared, reentrant FileLock object would not).
    lock = FileLock(plan.target, is_singleton=False)
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise TimeoutError(f"registry lock ({plan.describe()}) not acquired in {timeout_s:.0f} s: "
                           f"another gate or rollback holds it") from None
    try:
        yield plan
    finally:
        lock.release()


@contextmanager
def _advisory_lock(plan: LockPlan, timeout_s: float) -> Iterator[None]:
    """Session-level advisory lock on its own autocommit connection (no open transaction)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(plan.target, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            take = sqlalchemy.text("SELECT pg_try_advisory_lock(:key)")
            deadline = time.monotonic() + timeout_s
            while not conn.execute(take, {"key": plan.key}).scalar():
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"registry lock ({plan.describe()}) not acquired in "
                                       f"{timeout_s:.0f} s: another gate or rollback holds it")
                time.sleep(0.5)
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": plan.key})
    finally:
        engine.dispose()


def lock_for(cfg: PipelineConfig) -> LockPlan:
    """The registry lock of the configured model; remote stores lock under reports_root."""
    return plan_registry_lock(cfg.mlflow.tracking_uri, cfg.mlflow.registered_model,
                              lock_dir=cfg.paths.reports_root / "locks")


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
