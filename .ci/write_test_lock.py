"""Rewrite the `test` extra in pyproject.toml from `pip freeze` on stdin.

The `test` extra is a lock: every package of a passing test environment at an exact version, so a
new release of any dependency (direct or not) cannot turn main red by itself. `.ci/refresh-test-lock`
builds that environment from the unpinned `test-latest` extra, runs the tests, then calls this.
"""

import re
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
BEGIN = "# BEGIN test lock (written by .ci/refresh-test-lock; do not edit by hand)"
END = "# END test lock"


def lock_lines(freeze: str) -> list[str]:
    pins = []
    for line in freeze.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e ")) or "@" in line or "==" not in line:
            continue
        name, version = line.split("==", 1)
        if name.lower() == "zipserve":
            continue
        version = re.sub(r"\+.*$", "", version)  # torch==2.13.0+cpu -> the same pin on any index
        pins.append(f'    "{name}=={version}",')
    return sorted(pins, key=lambda pin: pin.split("==")[0].lower())


def main() -> None:
    text = PYPROJECT.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    body = "\n".join(lock_lines(sys.stdin.read()))
    PYPROJECT.write_text(text[:start] + "\n" + body + "\n    " + text[end:])


if __name__ == "__main__":
    main()
