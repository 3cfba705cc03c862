"""mypy, strict, passes on agent/ and drivers/ (pyproject.toml's ``[tool.mypy]``, issue 13)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from support import REPO


def test_mypy_strict_finds_nothing() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (it is in the test extra: pip install -e '.[test]')")
    # No arguments: the files, strictness and per-library exceptions all come from pyproject.toml.
    r = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, f"python -m mypy (exit {r.returncode}):\n{r.stdout}{r.stderr}"
