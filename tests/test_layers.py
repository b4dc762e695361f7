"""The layer order of docs/architecture.rst holds: import-linter's contracts in pyproject.toml.

An upward import (a lower layer importing a higher one), a cycle between the modules of one
package, or a product module importing ``ulogd.testing`` fails this test, and so the default
tier.  The second test shows the contracts bite: the same check over a copy of the package
with one upward import added must fail and name it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_layer_contracts_are_kept() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layer_contract(tmp_path: Path) -> None:
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "ulogd", tmp_path / "ulogd", ignore=skip)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    wire = tmp_path / "ulogd" / "protocol" / "wire.py"
    wire.write_text(wire.read_text() + "\nfrom ulogd.engine import server  # noqa: E402\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "ulogd.protocol.wire -> ulogd.engine.server" in result.stdout, result.stdout
