"""The `qudata-agent` command line: `run` (the daemon), `doctor`, `status`, `firewall
apply` (the wall without the agent, at boot), `version`, and the installer's
`state` and `docker-config` (admin.py).

What stays true: a configuration error exits 2 with one line naming the
variable, before anything is created on disk; `run` exits 0 after a clean
SIGTERM/SIGINT stop and 1 when it cannot start; `doctor` exits 0 exactly when
the host is ready (1 otherwise); `status` exits 0 when the agent answers and 3
when it does not. `doctor` and `status` only look: they create nothing;
`firewall apply` exits 0 when the wall stands and 1 when it cannot be applied;
`state` and `docker-config` read no settings (their arguments name the files).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qudata_agent import __version__, admin
from qudata_agent.settings import help_rows

if TYPE_CHECKING:
    from qudata_agent.config import Settings

# Read by `doctor` and `status` when no config file is named (install.sh writes it).
DEFAULT_CONFIG_FILE = Path("/etc/qudata-agent/agent.env")

EXIT_CODES_HELP = (
    (0, "stopped cleanly (SIGTERM or SIGINT)"),
    (1, "could not start (state dir, port, HTTP server)"),
    (2, "configuration error (the message names the variable)"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qudata-agent", description="QuData host agent for GPU hosts."
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    settings = help_rows()  # each setting's declaration (settings.py)
    width = max(len(name) for name, _ in settings) + 2
    epilog = "settings (environment, or KEY=VALUE lines in --config FILE):\n"
    epilog += "".join(f"  {name:<{width}}{meaning}\n" for name, meaning in settings)
    epilog += "\nexit codes:\n" + "".join(f"  {code}  {what}\n" for code, what in EXIT_CODES_HELP)
    run = sub.add_parser(
        "run",
        help="run the agent (the daemon)",
        description="Runs the agent until SIGTERM or SIGINT.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--api-key",
        metavar="KEY",
        help="control-plane API key (kept in the state dir, mode 0600, for later starts); "
        "prefer QUDATA_API_KEY or the config file: arguments show in `ps`",
    )
    _config_option(run)
    doctor = sub.add_parser("doctor", help="check that this host is ready to rent out")
    status = sub.add_parser("status", help="show the agent, its instance and its links")
    for command in (doctor, status):
        _config_option(command, f"$QUDATA_CONFIG_FILE, else {DEFAULT_CONFIG_FILE} if present")
        command.add_argument("--json", action="store_true", help="print JSON, not text")
    firewall = sub.add_parser(
        "firewall",
        help="install the tenant firewall without the agent (the boot unit runs it)",
        description="apply: installs or repairs the tenant firewall of the settings, as the"
        " agent would; run at boot before Docker starts containers. Exit 0 when it stands.",
    )
    firewall.add_argument("action", choices=["apply"])
    _config_option(firewall, f"$QUDATA_CONFIG_FILE, else {DEFAULT_CONFIG_FILE} if present")
    sub.add_parser("version", help="print the agent's version")
    admin.add_parsers(sub)
    return parser


def _config_option(parser: argparse.ArgumentParser, default: str = "$QUDATA_CONFIG_FILE") -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help=f"env-style KEY=VALUE file (default: {default}); the environment wins",
    )


def _look(command: str, settings: Settings, config_file: Path | None, as_json: bool) -> int:
    """`doctor` or `status`: read-only, their own output, no log lines on the way."""
    logging.getLogger().setLevel(logging.ERROR)  # e.g. NVML's "no GPU" warning
    if command == "doctor":
        from qudata_agent import doctor
        from qudata_agent.tunnel_doctor import tunnel_checks

        checks = doctor.run_checks(settings, doctor.HostProbes(settings), config_file)
        checks += tunnel_checks(settings)
        print(doctor.to_json(checks) if as_json else doctor.render(checks))
        return doctor.exit_code(checks)
    from qudata_agent import status

    report = status.gather(settings)
    print(status.to_json(report) if as_json else status.render(report))
    return status.exit_code(report)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    if args.command in admin.COMMANDS:
        return admin.run(args)
    from qudata_agent import logs
    from qudata_agent.config import ConfigError, load_settings

    looking = args.command in ("doctor", "status", "firewall")
    try:
        settings = load_settings(config_file=args.config, api_key=getattr(args, "api_key", None))
        config_file = args.config or settings.config_file
        if looking and config_file is None and DEFAULT_CONFIG_FILE.is_file():
            config_file = DEFAULT_CONFIG_FILE  # what install.sh writes and the unit reads
            settings = load_settings(config_file=config_file)
    except ConfigError as e:
        print(f"qudata-agent: configuration error: {e}", file=sys.stderr)
        return 2
    logs.redact(settings.api_key)
    if args.command == "firewall":
        from qudata_agent.wall import apply_wall

        return apply_wall(settings)
    if looking:
        return _look(args.command, settings, config_file, args.json)
    os.umask(0o077)  # everything the agent writes (database, secrets, log file) is private
    try:
        if settings.log_file is not None:
            settings.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        logs.setup(
            settings.log_level,
            settings.log_format,
            file=settings.log_file,
            file_max_bytes=settings.log_file_max_mb * 1024 * 1024,
            journal=logs.stderr_is_journal(settings.journal_stream),
        )
    except OSError as e:
        print(f"qudata-agent: QUDATA_LOG_FILE: cannot be opened ({e.strerror})", file=sys.stderr)
        return 2
    from qudata_agent import app  # the daemon only: `status` and `doctor` never load it

    return app.run(settings)


if __name__ == "__main__":
    sys.exit(main())
