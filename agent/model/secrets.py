"""Credentials come from files only the agent's user (and its group) can read."""

from __future__ import annotations

import stat
from pathlib import Path


def secret_problem(path: Path) -> str | None:
    """Why ``path`` is not acceptable as a secret, or None."""
    try:
        mode = path.stat().st_mode
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    if mode & stat.S_IROTH:
        return (f"{path} is readable by everyone (mode {stat.S_IMODE(mode):04o}); "
                "chmod o-rwx it (e.g. 0640 root:lorry-agent)")
    return None


def read_secret(path: Path) -> bytes:
    """The file's bytes; refuses a world-readable file (a secret anyone on the box can copy)."""
    if (problem := secret_problem(path)) is not None:
        raise PermissionError(problem)
    return path.read_bytes()
