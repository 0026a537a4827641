"""The `qudata-agent` command line: `run` (the daemon) and `version`.

What stays true: a configuration error exits 2 with one line naming the
variable, before anything is created on disk; `run` exits 0 after a clean
SIGTERM/SIGINT stop and 1 when it cannot start.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qudata_agent import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qudata-agent", description="QuData host agent for GPU hosts."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent (the daemon)")
    run.add_argument(
        "--api-key",
        metavar="KEY",
        help="control-plane API key (kept in the state dir, mode 0600, for later starts); "
        "prefer QUDATA_API_KEY or the config file: arguments show in `ps`",
    )
    run.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="env-style KEY=VALUE file (default: $QUDATA_CONFIG_FILE); the environment wins",
    )
    sub.add_parser("version", help="print the agent's version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    from qudata_agent import app, logs
    from qudata_agent.config import ConfigError, load_settings

    try:
        settings = load_settings(config_file=args.config, api_key=args.api_key)
    except ConfigError as e:
        print(f"qudata-agent: configuration error: {e}", file=sys.stderr)
        return 2
    os.umask(0o077)  # everything the agent writes (database, secrets) is private
    logs.setup(settings.log_level, settings.log_format)
    logs.redact(settings.api_key)
    return app.run(settings)


if __name__ == "__main__":
    sys.exit(main())
