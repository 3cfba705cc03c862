"""ruff (the rules in pyproject.toml's ``[tool.ruff]``) passes on every Python file we ship or run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support import REPO

PATHS = ("agent", "drivers", "tests", "bench")


def ruff(*paths: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *paths],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    if r.returncode not in (0, 1) or "No module named ruff" in r.stderr:
        pytest.fail(f"ruff did not run (it is in the test extra: pip install -e '.[test]'):\n{r.stderr}")
    return r


def test_ruff_finds_nothing() -> None:
    r = ruff(*PATHS)
    assert r.returncode == 0, f"ruff check {' '.join(PATHS)}:\n{r.stdout}{r.stderr}"
