"""The `zipserve` command: one subcommand per job, each a thin wrapper over library code."""

from __future__ import annotations

import argparse
import sys

from zipserve.deploy.cli_bench import add_bench_command
from zipserve.deploy.cli_offline import add_offline_commands
from zipserve.deploy.cli_serve import add_serve_commands
from zipserve.deploy.shipped import PACKAGE_ROOT, REFERENCE_MODEL, default_model

__all__ = ["PACKAGE_ROOT", "REFERENCE_MODEL", "build_parser", "default_model", "main"]
"""PACKAGE_ROOT, REFERENCE_MODEL and default_model live in deploy/shipped.py; tests and
bench/seqpar_bench.py import them from here."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zipserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_offline_commands(sub)  # generate, train, calibrate, eval: deploy/cli_offline.py
    add_serve_commands(sub)  # serve, demo: deploy/cli_serve.py
    add_bench_command(sub)  # bench: deploy/cli_bench.py
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except ValueError as e:  # bad input: say what, no traceback
        print(f"zipserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
