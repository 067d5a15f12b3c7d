"""``python -m gateway`` runs the same command line as ``gateway``."""

import sys

from gateway.cli import main

sys.exit(main())
