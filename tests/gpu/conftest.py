"""tests/gpu holds scripts run by hand on a GPU machine (see README.md), never by pytest."""

collect_ignore_glob = ["*.py"]
