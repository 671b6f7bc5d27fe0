"""The build manifest (docs/contracts.md): per-log counts of used, quarantined and explained
records, per-domain sample and label counts, and the check that every record read is
accounted for (the job fails rather than write a manifest that does not add up).
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from core.config import PipelineConfig
from core.contracts import CLICK, CONVERSION, SCENARIO_ID, TYPE_ID, feature_columns, sample_id_column
from core.vocab import Vocabulary
from spark_jobs.reasons import DUPLICATE, EXPLAINED, LOGS, QUARANTINED, USED, AccountingError


def status_counts(df: DataFrame) -> dict[str, dict[str, int]]:
    """{"used": {"": n}, "quarantined": {reason: n}, "explained": {reason: n}}."""
    out: dict[str, dict[str, int]] = {USED: {}, QUARANTINED: {}, EXPLAINED: {}}
    for row in df.groupBy("status", "reason").count().collect():
        out[row["status"]][row["reason"] or ""] = int(row["count"])
    return out


def _check_invariant(log: str, records: int, used: int, quarantined: dict[str, int],
                     explained: dict[str, int]) -> None:
    total = used + sum(quarantined.values()) + sum(explained.values())
    if total != records:
        raise AccountingError(f"{log}: {records} records but {used} used + {sum(quarantined.values())} "
                              f"quarantined + {sum(explained.values())} explained = {total}")


def domain_stats(cfg: PipelineConfig, unique_imps: DataFrame, labels: DataFrame
                 ) -> tuple[list[dict], dict[str, int], dict[str, int]]:
    """Per-domain and total sample, click and conversion counts, and per feature column the
    samples whose value is missing (id 0: the hash of a null, empty or absent field), without
    materializing the samples: impressions counted per domain, labels joined onto (small)
    clicked ones. Validation checks the missing shares against a ceiling and trailing days."""
    imp_id = sample_id_column(cfg)
    domain = [cfg.domains.type_field, cfg.domains.scenario_field, TYPE_ID, SCENARIO_ID]
    features = feature_columns(cfg)
    grouped = unique_imps.groupBy(*domain).agg(
        F.count(F.lit(1)).alias("count"), *[F.sum((F.col(c) == 0).cast("long")).alias(c) for c in features]).collect()
    missing = {c: sum(int(r[c] or 0) for r in grouped) for c in features}
    counts = {tuple(r[c] for c in domain): [int(r["count"]), 0, 0] for r in grouped}
    labelled = (unique_imps.select(imp_id, *domain).join(F.broadcast(labels), imp_id)
                .groupBy(*domain).agg(F.sum(CLICK).alias("c"), F.sum(CONVERSION).alias("v")).collect())
    for r in labelled:
        counts[tuple(r[c] for c in domain)][1:] = [int(r["c"]), int(r["v"])]
    per_domain = [{"conversion_type": k[0], "display_scenario": k[1], "type_id": int(k[2]), "scenario_id": int(k[3]),
                   "samples": n, "clicks": c, "conversions": v}
                  for k, (n, c, v) in sorted(counts.items(), key=lambda kv: (kv[0][2], kv[0][3]))]
    outputs = {key: sum(d[key] for d in per_domain) for key in ("samples", "clicks", "conversions")}
    return per_domain, outputs, missing


def assemble_manifest(cfg: PipelineConfig, day: str, *, inputs: dict[str, tuple[list[str], int]],
                      imp_reasons: dict[str | None, int], samples: int,
                      click_counts: dict[str, dict[str, int]], conv_counts: dict[str, dict[str, int]],
                      outputs: dict[str, int], per_domain: list[dict],
                      files: dict[str, Any] | None = None, missing: dict[str, int] | None = None
                      ) -> dict[str, Any]:
    """The manifest of docs/contracts.md; raises AccountingError if any record is unaccounted."""
    valid_imps = imp_reasons.get(None, 0)
    used = {"impressions": samples, "clicks": click_counts[USED].get("", 0),
            "conversions": conv_counts[USED].get("", 0)}
    quarantined = {"impressions": {r: n for r, n in imp_reasons.items() if r is not None},
                   "clicks": click_counts[QUARANTINED], "conversions": conv_counts[QUARANTINED]}
    explained = {"impressions": {DUPLICATE: valid_imps - samples} if valid_imps > samples else {},
                 "clicks": click_counts[EXPLAINED], "conversions": conv_counts[EXPLAINED]}
    for log in LOGS:
        quarantined[log] = dict(sorted(quarantined[log].items()))
        explained[log] = dict(sorted(explained[log].items()))
        _check_invariant(log, inputs[log][1], used[log], quarantined[log], explained[log])
    if used["clicks"] != outputs["clicks"] or used["conversions"] != outputs["conversions"]:
        raise AccountingError(f"labels written ({outputs}) differ from records used ({used})")
    records = sum(n for _, n in inputs.values())
    n_quarantined = sum(sum(q.values()) for q in quarantined.values())
    return {
        "day": day,
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config_hash": cfg.config_hash(),
        "inputs": {log: {"partitions": parts, "records": n} for log, (parts, n) in inputs.items()},
        "used": used,
        "quarantined": quarantined,
        "explained": explained,
        "outputs": outputs,
        "per_domain": per_domain,
        "missing": missing or {},  # samples per feature column with id 0 (value missing)
        "quarantine_share": round(n_quarantined / records, 6) if records else 0.0,
        # Every file under the partitions read: read, skipped (with why) or corrupt (with its error).
        "files": files or {},
    }


def warn_capacity(cfg: PipelineConfig, types: Vocabulary, scenarios: Vocabulary) -> None:
    """Warn, not fail: the vocabulary grows with the data, the model's capacity is config."""
    if len(types) > cfg.domains.max_types or len(scenarios) > cfg.domains.max_scenarios:
        print(f"WARNING: vocabularies hold {len(types)} types / {len(scenarios)} scenarios, over the model's "
              f"capacity ({cfg.domains.max_types} / {cfg.domains.max_scenarios}): those ids are rejected "
              "at training and serving time", file=sys.stderr)


def summary(manifest: dict[str, Any], phases: dict[str, float], cfg: PipelineConfig) -> str:
    """The job's closing report: counts per log and reason, and where the time went."""
    out = manifest["outputs"]
    lines = [f"build {manifest['day']}: {out['samples']} samples, {out['clicks']} clicks, "
             f"{out['conversions']} conversions, {len(manifest['per_domain'])} domains in {sum(phases.values()):.1f}s",
             f"  samples -> {cfg.paths.samples_dir(manifest['day'])}",
             "  phases: " + ", ".join(f"{name} {sec:.1f}s" for name, sec in phases.items())]
    for log in LOGS:
        q, e = manifest["quarantined"][log], manifest["explained"][log]
        lines.append(f"  {log:<11} {manifest['inputs'][log]['records']:>9} records = {manifest['used'][log]} used"
                     f" + {sum(q.values())} quarantined + {sum(e.values())} explained")
        for kind, reasons in (("quarantined", q), ("explained", e)):
            if reasons:
                lines.append(f"      {kind}: " + ", ".join(f"{r}={n}" for r, n in reasons.items()))
    for log, files in (manifest.get("files") or {}).items():
        for entry in files["skipped"]:
            lines.append(f"  {log}: skipped {entry['file']}: {entry['reason']}")
        for entry in files["corrupt"]:
            lines.append(f"  {log}: CORRUPT, not read: {entry['file']}: {entry['error']}")
    lines.append(f"  quarantine share {manifest['quarantine_share']:.4%}")
    return "\n".join(lines)
