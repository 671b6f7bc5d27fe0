"""The Great Expectations side of a run: the file-mode context under ``<lake_root>/gx``,
a cross-process lock, and each suite registered afresh and run under one run id with its
Data Docs pages. Kept apart from the runner so the GX plumbing can change with GX versions
without touching what a run checks or reports.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import great_expectations as gx
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.exceptions import DataContextError

from core.config import PipelineConfig
from validation.docs import data_docs_dir
from validation.suite import MANIFEST_SUITE, SAMPLES_SUITE

SITE_NAME = "mmn_data_docs"


@contextmanager
def gx_lock(cfg: PipelineConfig) -> Iterator[None]:
    """Serialize GX work across processes (backfills validate days in parallel).

    Suites, checkpoints and data sources have fixed names and are re-created per run, and
    the Data Docs index is shared; without the lock two days could clobber each other.
    """
    path = cfg.paths.lake_root / "gx" / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _open_context(cfg: PipelineConfig) -> Any:
    """File-mode context under <lake_root>/gx (created on first use), docs in reports."""
    root = cfg.paths.lake_root / "gx"
    root.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=root)
    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": str(_gx_site_dir(cfg)),
        },
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "show_cta_footer": False},
    }
    sites = context.get_config().data_docs_sites or {}
    changed = False
    for stale in [name for name in sites if name != SITE_NAME]:
        context.delete_data_docs_site(stale)
        changed = True
    if sites.get(SITE_NAME) != site:
        if SITE_NAME in sites:
            context.update_data_docs_site(SITE_NAME, site)
        else:
            context.add_data_docs_site(SITE_NAME, site)
        changed = True
    bars = context.variables.progress_bars  # a dict once read back from the yml
    if (bars.get("globally") if isinstance(bars, dict) else getattr(bars, "globally", True)):
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        changed = True
    if changed:
        context.variables.save()
    return context


def _gx_site_dir(cfg: PipelineConfig) -> Path:
    return data_docs_dir(cfg) / "gx"


def _forget_previous_run(context: Any, cfg: PipelineConfig, run_name: str) -> None:
    """Drop stored results and pages of earlier runs for the same day (idempotent reruns)."""
    store = context.validation_results_store
    for key in store.list_keys():
        if key.run_id.run_name == run_name:
            store.remove_key(key)
    for suite in (SAMPLES_SUITE, MANIFEST_SUITE):
        shutil.rmtree(_gx_site_dir(cfg) / "validations" / suite / run_name, ignore_errors=True)


@dataclass(frozen=True)
class SuiteRun:
    """A suite, its severities and the batch (data source name, engine, frame) it checks."""

    suite: Any
    severities: Mapping[str, str]
    source: str
    engine: str
    data: Any


def run_gx(cfg: PipelineConfig, day: str, runs: Sequence[SuiteRun]
            ) -> tuple[dict[str, tuple[Any, Any]], dict[str, str]]:
    """Run every suite under one run id; results by suite name and their Data Docs pages."""
    with gx_lock(cfg):
        context = _open_context(cfg)
        run_id = RunIdentifier(run_name=f"dt={day}", run_time=datetime.now(UTC))
        _forget_previous_run(context, cfg, run_id.run_name)
        results = {
            run.suite.name: _run_suite(context, run.suite, run.source, run.engine, run.data,
                                       run_id)
            for run in runs
        }
        return results, _docs_pages(context, cfg, results)


def _run_suite(
    context: Any, suite: Any, source: str, engine: str, data: Any, run_id: RunIdentifier
) -> tuple[Any, Any]:
    """Register suite, batch, validation definition and checkpoint afresh; run.

    Old objects of the same name are deleted first rather than add_or_update'd: updating
    a stored suite compares every expectation pairwise, seconds per run for ~100 of them.
    """
    for factory in (context.checkpoints, context.validation_definitions, context.suites):
        _delete_if_present(factory, suite.name)
    if engine == "spark":
        datasource = context.data_sources.add_or_update_spark(name=source)
    else:
        datasource = context.data_sources.add_or_update_pandas(name=source)
    batch_def = datasource.add_dataframe_asset(name="day").add_batch_definition_whole_dataframe(
        "whole"
    )
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=suite.name, data=batch_def, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=suite.name,
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=[SITE_NAME])],
            result_format="SUMMARY",
        )
    )
    outcome = checkpoint.run(batch_parameters={"dataframe": data}, run_id=run_id)
    ((identifier, result),) = outcome.run_results.items()
    return identifier, result


def _delete_if_present(factory: Any, name: str) -> None:
    try:
        factory.delete(name)
    except DataContextError:
        pass  # first run: nothing stored under that name yet



def _docs_pages(context: Any, cfg: PipelineConfig, results: Mapping[str, tuple[Any, Any]]
                ) -> dict[str, str]:
    """Each suite's GX validation page, relative to the data docs directory."""
    pages = {}
    for suite, (identifier, _) in results.items():
        urls = context.get_docs_sites_urls(resource_identifier=identifier, site_name=SITE_NAME)
        if urls and urls[0].get("site_url"):
            target = Path(unquote(urlparse(urls[0]["site_url"]).path))
            pages[suite] = os.path.relpath(target, data_docs_dir(cfg))
    return pages
