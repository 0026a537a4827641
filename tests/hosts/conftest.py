"""tests/hosts: checks run by hand on a host with a kernel feature CI's lacks, never by pytest."""

collect_ignore_glob = ["*.py"]
