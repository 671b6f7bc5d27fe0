"""The Data Docs landing page: one row per validated day, failures first-class.

GX's own site (built under ``<data_docs>/gx/``) lists runs but shows neither our
error/warning split nor which check failed until you click through. This page is
regenerated from every stored ``results.json`` (the source of truth, one per day), so it
stays correct across reruns and never needs its own state.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from core.config import PipelineConfig

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}.ok{color:#176f2c}.bad{color:#b00020;font-weight:bold}
.warn{color:#8a5a00}code{font-size:90%}h2{margin-top:1.5em}
"""


def data_docs_dir(cfg: PipelineConfig) -> Path:
    return cfg.paths.reports_root / "data_docs"


def stored_results(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Every day's stored results, newest day first."""
    root = cfg.paths.validation_dir("any").parent  # <lake_root>/validation
    out = []
    for path in sorted(root.glob("dt=*/results.json"), reverse=True):
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            continue
    return out


def write_index(cfg: PipelineConfig) -> Path:
    """(Re)write ``<reports_root>/data_docs/index.html`` from the stored results."""
    docs = data_docs_dir(cfg)
    docs.mkdir(parents=True, exist_ok=True)
    days = stored_results(cfg)
    body = [
        "<h1>Samples validation</h1>",
        '<p>Errors stop training; warnings are logged. Full GX Data Docs: '
        '<a href="gx/index.html">gx/index.html</a></p>',
        _overview(days),
        *(_day_section(d) for d in days),
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Samples validation</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>"
    )
    index = docs / "index.html"
    _atomic_write(index, page)
    return index


def write_day_page(cfg: PipelineConfig, day: str, out_dir: Path) -> Path | None:
    """One day's validation as a self-contained page ``<out_dir>/dt=<day>.html`` (inline
    style, no links to other files: it is what the day's MLflow run shows, and MLflow's
    artifact viewer cannot follow relative links). None when the day has no stored results."""
    path = cfg.paths.validation_dir(day) / "results.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    body = ["<h1>Samples validation</h1>", _overview([result]), _day_section(result, links=False)]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Validation dt={_e(day)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"dt={day}.html"
    _atomic_write(target, page)
    return target


def _overview(days: Iterable[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td><a href='#dt={_e(d['day'])}'>{_e(d['day'])}</a></td>{_status(d)}"
        f"<td>{d.get('n_rows', '')}</td><td>{len(d.get('errors', []))}</td>"
        f"<td>{len(d.get('warnings', []))}</td></tr>"
        for d in days
    )
    return (
        "<table><tr><th>day</th><th>status</th><th>rows</th><th>errors</th>"
        f"<th>warnings</th></tr>{rows}</table>"
    )


def _status(d: dict[str, Any]) -> str:
    if d.get("success"):
        return "<td class='ok'>passed</td>"
    return "<td class='bad'>FAILED</td>"


def _day_section(d: dict[str, Any], links: bool = True) -> str:
    """A day's checks; ``links=False`` names the GX pages (under the local Data Docs folder)
    as text instead of relative links, for a page read outside that folder."""
    pages = d.get("docs_pages", {}).items()
    if links:
        listed = " ".join(f"<a href='{_e(path)}'>{_e(suite)}</a>" for suite, path in pages)
    else:
        listed = " ".join(f"{_e(suite)} (<code>data_docs/{_e(path)}</code>)" for suite, path in pages)
    parts = [
        f"<h2 id='dt={_e(d['day'])}'>dt={_e(d['day'])} — "
        f"{'passed' if d.get('success') else 'FAILED'}</h2>",
        f"<p>GX validation pages: {listed} · validated at {_e(d.get('validated_at', ''))} "
        f"with {_e(d.get('engine', ''))} in {d.get('seconds', 0):.1f}s</p>",
        _checks_table("Errors", "bad", d.get("errors", [])),
        _checks_table("Warnings", "warn", d.get("warnings", [])),
    ]
    if d.get("notes"):
        parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in d["notes"]) + "</ul>")
    return "".join(parts)


def _checks_table(title: str, css: str, checks: list[dict[str, Any]]) -> str:
    if not checks:
        return f"<p class='ok'>No {title.lower()}.</p>"
    rows = "".join(
        f"<tr><td class='{css}'>{_e(c['check'])}</td><td><code>{_e(c['name'])}</code></td>"
        f"<td>{_e(c.get('column') or '')}</td><td>{_e(json.dumps(c['observed'], default=str))}"
        f"</td><td>{_e(c['expected'])}</td></tr>"
        for c in checks
    )
    return (
        f"<h3>{title}</h3><table><tr><th>check</th><th>expectation</th><th>column</th>"
        f"<th>observed</th><th>expected</th></tr>{rows}</table>"
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
