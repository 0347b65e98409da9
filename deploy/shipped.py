"""Where the package and its shipped checkpoints are, and the model a command uses by default."""

from __future__ import annotations

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_MODEL = PACKAGE_ROOT / "models" / "zipserve-ref"
LCKV_MODEL = PACKAGE_ROOT / "models" / "zipserve-lckv"


def default_model() -> str:
    """The shipped reference checkpoint; random:tiny where it is absent (a bare install)."""
    return str(REFERENCE_MODEL) if (REFERENCE_MODEL / "config.json").exists() else "random:tiny"
