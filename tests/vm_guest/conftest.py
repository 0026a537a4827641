"""Tests that run inside the Debian 13 test VM only (tests/vm/ starts them there).

They read what only a cgroup v2 host with a newer Docker has, so outside the
VM they are not collected at all (`QUDATA_IN_VM=1` is set by tests/vm/).
"""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("QUDATA_IN_VM") == "1" else ["test_*.py"]
