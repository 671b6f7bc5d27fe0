"""`mmn <stage> --help` is light and speaks `mmn` (issue 18, item 5).

Help is printed before any heavy library is imported (torch, GX, pyspark, MLflow, pandas
load inside the commands), usage lines name `mmn <stage>`, every option has a help text, and
the options of the pass-through stages match the parsers of the modules that run them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from mmn.cli import GENERATOR_PRESETS, LOG_FORMATS, PASSTHROUGH, VALIDATION_ENGINES, build_parser
from mmn.model_kinds import MODEL_KINDS

HEAVY = ("torch", "great_expectations", "pyspark", "mlflow", "pandas")
STAGES = ["generate", "build", "validate", "train", "evaluate", "gate", "run-day", "compare", "rollback",
          "serve", "mlflow-ui", "airflow", "backfill", "demo", "config"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _run_mmn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mmn.cli", *args], capture_output=True, text=True, timeout=120)


def test_importing_the_cli_imports_no_heavy_library():
    probe = ("import json, sys; import mmn.cli; "
             f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize("stage", ["validate", "generate", "compare", "train"])
def test_help_of_a_stage_is_mmn_stage_and_loads_nothing_heavy(stage):
    probe = ("import json, sys\nfrom mmn.cli import main\n"
             f"try:\n    main([{stage!r}, '--help'])\nexcept SystemExit:\n    pass\n"
             f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    usage, _, loaded = result.stdout.rpartition("\n[")
    assert usage.startswith(f"usage: mmn {stage} "), result.stdout[:300]
    assert "python -m" not in usage
    assert json.loads("[" + loaded) == []


def test_every_stage_is_listed_and_every_option_has_help():
    stages = _subparsers(build_parser())
    assert set(STAGES) <= set(stages)
    for name, parser in stages.items():
        assert parser.prog == f"mmn {name}"
        for action in parser._actions:
            assert action.help, f"mmn {name}: {action.option_strings or action.dest} has no help text"


def test_model_kind_lists_its_choices():
    stages = _subparsers(build_parser())
    for name in ("train", "run-day"):
        action = next(a for a in stages[name]._actions if "--model-kind" in a.option_strings)
        assert tuple(action.choices) == MODEL_KINDS
    result = _run_mmn("train", "--day", "2026-11-01", "--model-kind", "no_such_kind")
    assert result.returncode == 2 and "usage: mmn train" in result.stderr and "no_such_kind" in result.stderr


def test_usage_errors_of_pass_through_stages_name_mmn():
    result = _run_mmn("validate")
    assert result.returncode == 2
    assert "usage: mmn validate" in result.stderr and "--day" in result.stderr
    assert "python -m" not in result.stderr


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings if opt not in ("-h", "--help")}


def test_pass_through_parsers_match_the_modules_that_run_them():
    """`mmn generate|validate|compare` check arguments with the CLI's parser, then hand them to
    the module: both parsers must accept the same options with the same choices."""
    from simulation.generate_logs import build_parser as generate_parser
    from simulation.presets import PRESETS
    from simulation.writers import FORMATS
    from validation.runner import ENGINES
    from validation.runner import _parser as validate_parser

    assert GENERATOR_PRESETS == tuple(sorted(PRESETS)) and LOG_FORMATS == FORMATS
    assert VALIDATION_ENGINES == ENGINES
    stages = _subparsers(build_parser())
    for name, module_parser in (("generate", generate_parser()), ("validate", validate_parser())):
        mine, theirs = _options(stages[name]), _options(module_parser)
        assert set(mine) == set(theirs), name
        for opt, action in mine.items():
            assert action.required == theirs[opt].required, (name, opt)
            assert (tuple(action.choices) if action.choices else None) == (
                tuple(theirs[opt].choices) if theirs[opt].choices else None), (name, opt)
    # mmn.compare builds its parser inside main(): compare the option names of its help.
    help_text = subprocess.run([sys.executable, "-m", "mmn.compare", "--help"], capture_output=True, text=True,
                               timeout=300).stdout
    theirs = {word.strip("[],") for word in help_text.split() if word.startswith(("--", "[--"))}
    theirs = {w.lstrip("[") for w in theirs} - {"--help"}
    assert set(_options(stages["compare"])) == theirs
    assert set(PASSTHROUGH) == {"generate", "validate", "compare"}


def test_readme_names_only_real_commands_and_configured_paths():
    """The README's commands exist (`mmn <command>`, `make <target>`), and its "Where outputs
    land" table names paths under the configured roots, with the admin password's file."""
    import re

    from core.config import REPO_ROOT, load_config

    readme = (REPO_ROOT / "README.md").read_text()
    commands = set(_subparsers(build_parser()))
    for name in re.findall(r"mmn ([a-z][a-z-]+)", readme):
        assert name in commands, f"README names `mmn {name}`, which does not exist"
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO_ROOT / "Makefile").read_text(), flags=re.M))
    for target in re.findall(r"`make ([a-z][a-z-]+)", readme):
        assert target in targets, f"README names `make {target}`, which the Makefile lacks"
    section = readme.split("## Where outputs land", 1)[1].split("\n## ", 1)[0]
    paths = load_config(environ={}).paths
    roots = {str(p.relative_to(REPO_ROOT)) for p in (paths.raw_root, paths.lake_root, paths.truth_root,
                                                      paths.reports_root)} | {"data/mlflow", ".airflow"}
    cells = re.findall(r"`((?:data|\.airflow)/[^`]+)`", section)
    assert cells and all(any(c.startswith(root) for root in roots) for c in cells), cells
    for expected in (paths.samples_dir("D"), paths.quarantine_dir("D"), paths.manifest_path("D"), paths.failures_log):
        assert str(expected.relative_to(REPO_ROOT)) in section
    assert ".airflow/simple_auth_manager_passwords.json.generated" in section
    for heading in ("## Comparing models", "## SSIM", "## Troubleshooting", "### The Airflow UI and its admin password"):
        assert heading in readme
