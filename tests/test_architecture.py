"""The layering contract (pyproject.toml [tool.importlinter]) holds: imports only point down."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_imports_only_point_down_the_layers() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


MAX_MODULE_LINES = 600
PRODUCT_PACKAGES = ("core", "spark_jobs", "validation", "training", "serving", "simulation", "mmn", "dags")


def test_no_product_module_mixes_concerns_by_size() -> None:
    """Big modules were where concerns mixed (issue 15): a module past this size is split
    along its seams rather than grown."""
    too_big = {str(path.relative_to(REPO)): n for package in PRODUCT_PACKAGES
               for path in (REPO / package).rglob("*.py")
               if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not too_big, f"split these modules (> {MAX_MODULE_LINES} lines): {too_big}"
