"""`python -m qudata_agent` runs the command line."""

import sys

from qudata_agent.cli import main

sys.exit(main())
