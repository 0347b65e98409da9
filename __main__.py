"""`python -m zipserve ...` runs the CLI."""

import sys

from zipserve.deploy.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn re-imports the main module
    sys.exit(main())
