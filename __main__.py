"""`python -m zipserve ...` runs the CLI."""

import sys

from zipserve.deploy.cli import main

sys.exit(main())
