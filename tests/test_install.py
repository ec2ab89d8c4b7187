"""The install as make runs it: quiet, with no notice printed once per package."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def install_command() -> str:
    """The pip line of make install's recipe, as make would run it (variables expanded)."""
    recipe = subprocess.run(["make", "-B", "-n", f"VENV={sys.prefix}", f"{sys.prefix}/bin/.installed"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    [line] = [line for line in recipe.splitlines() if "pip install" in line and " -e " in line]
    return line


def test_the_install_prints_no_editable_notice() -> None:
    """setuptools' "Editable installation" notice came once per editable package; the recipe's
    warning filter drops it. --no-deps: the packages are what build, the dependencies are here."""
    line = install_command().replace(" install ", " install --no-deps ", 1)
    result = subprocess.run(line, shell=True, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout + result.stderr
    assert "Editable installation" not in printed, printed[-2000:]
