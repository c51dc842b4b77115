"""``python -m fusionserve``."""

import sys

from fusionserve.cli.main import main

sys.exit(main())
