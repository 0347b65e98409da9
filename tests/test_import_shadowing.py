"""The repository root on sys.path must not hide installed distributions.

`python3 -m pytest` and `python3 -c ...` run from the repo root put it first on sys.path. Our
top-level folders (engine/, kernels/, router/, ...) are namespace portions of `zipserve` (no
__init__.py), so a regular package of the same name installed anywhere on sys.path wins the plain
import (`import kernels`), while `zipserve.kernels` stays ours. Each check runs in a subprocess
started in the repo root, as a user's would be.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL_PACKAGES = sorted(
    p.name
    for p in REPO_ROOT.iterdir()
    if p.is_dir() and not p.name.startswith((".", "_")) and any(p.glob("*.py"))
)


def _python_in_repo_root(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path is not None:  # after what the caller already has there
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (env.get("PYTHONPATH"), str(extra_path)) if p
        )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_top_level_folders_are_namespace_portions():
    assert "kernels" in TOP_LEVEL_PACKAGES and "engine" in TOP_LEVEL_PACKAGES
    regular = [name for name in TOP_LEVEL_PACKAGES if (REPO_ROOT / name / "__init__.py").exists()]
    assert regular == [], f"these folders would hide installed packages of the same name: {regular}"


def test_transformers_imports_from_the_repo_root():
    pytest.importorskip("transformers")
    out = _python_in_repo_root("import transformers; print(transformers.LlamaConfig.__name__)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "LlamaConfig"


def test_installed_kernels_distribution_wins_over_our_folder():
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("the PyPI distribution `kernels` is not installed here")
    out = _python_in_repo_root("import kernels; print(kernels.__file__)")
    assert out.returncode == 0, out.stderr[-2000:]
    origin = Path(out.stdout.strip()).resolve()
    assert REPO_ROOT not in origin.parents, f"`import kernels` found our folder: {origin}"


def test_every_top_level_name_loses_to_an_installed_package(tmp_path):
    """A regular package named like each of our folders, later on sys.path than the repo root,
    is the one `import NAME` finds; `zipserve.NAME` still resolves to our folder."""
    for name in TOP_LEVEL_PACKAGES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"MARK = 'installed {name}'\n")
    code = (
        "import importlib, zipserve\n"
        f"for name in {TOP_LEVEL_PACKAGES!r}:\n"
        "    print(name, importlib.import_module(name).MARK,"
        " list(importlib.import_module('zipserve.' + name).__path__)[0])\n"
    )
    out = _python_in_repo_root(code, extra_path=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(TOP_LEVEL_PACKAGES)
    for name, line in zip(TOP_LEVEL_PACKAGES, lines):
        got_name, _, mark_name, ours = line.split(" ", 3)
        assert (got_name, mark_name) == (name, name), line
        assert Path(ours).resolve() == REPO_ROOT / name, line


def test_every_top_level_folder_ships_in_the_wheel():
    """pyproject lists the packages by hand (namespace portions are not found by discovery):
    a new top-level folder must be listed there too."""
    import tomllib

    cfg = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    shipped = set(cfg["tool"]["setuptools"]["packages"])
    missing = [n for n in TOP_LEVEL_PACKAGES if n != "tests" and f"zipserve.{n}" not in shipped]
    assert missing == [], f"not in pyproject's [tool.setuptools] packages: {missing}"
