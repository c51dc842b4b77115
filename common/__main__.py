"""``python -m fusionserve``."""

import sys

from fusionserve.cli import main

sys.exit(main())
