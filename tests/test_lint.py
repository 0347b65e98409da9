"""The lint and format gates (issue 17): `ruff check` and `ruff format --check` pass on the whole
repository with the configuration in pyproject.toml. Here, so the README's test command (and CI)
runs them; ruff is pinned in the `test` extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ruff_lint_passes():
    out = _ruff("check", "--no-cache", ".")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_ruff_format_is_clean():
    out = _ruff("format", "--no-cache", "--check", ".")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
