"""``python -m gesso`` runs the command line."""

import sys

from gesso.cli import main

sys.exit(main())
