"""The Makefile: `make quickstart` installs Python packages only; `make test` also the review app's system packages."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO


def _planned(target: str) -> str:
    """The commands `make TARGET` would run from scratch (-B: as if nothing were built, -n: print only)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_quickstart_installs_no_system_packages():
    planned = _planned("quickstart")
    assert "pip install" in planned and "tunelab quickstart" in planned
    assert "system-deps.sh" not in planned


def test_test_target_installs_the_review_apps_system_packages_once():
    planned = _planned("test")
    assert "system-deps.sh" in planned and "pytest" in planned
    assert planned.index("system-deps.sh") < planned.index("pytest")
