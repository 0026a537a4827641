"""The `qudata-agent` command line: `run` (the daemon), `doctor`, `status`, `firewall
apply` (the wall without the agent, at boot) and `version`.

What stays true: a configuration error exits 2 with one line naming the
variable, before anything is created on disk; `run` exits 0 after a clean
SIGTERM/SIGINT stop and 1 when it cannot start; `doctor` exits 0 exactly when
the host is ready (1 otherwise); `status` exits 0 when the agent answers and 3
when it does not. `doctor` and `status` only look: they create nothing;
`firewall apply` exits 0 when the wall stands and 1 when it cannot be applied.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qudata_agent import __version__

if TYPE_CHECKING:
    from qudata_agent.config import Settings

# Read by `doctor` and `status` when no config file is named (install.sh writes it).
DEFAULT_CONFIG_FILE = Path("/etc/qudata-agent/agent.env")

# `run --help`: the settings (README's Configuration table has the details).
SETTINGS_HELP = (
    ("QUDATA_API_KEY", "control-plane API key (none: standalone); kept in STATE_DIR/api_key"),
    ("QUDATA_API_URL", "control-plane base URL (https://internal.qudata.ai/v0)"),
    ("QUDATA_AGENT_HOST", "address the API listens on (0.0.0.0)"),
    ("QUDATA_AGENT_PORT", "API port (previous one, else the first free from 1024)"),
    ("QUDATA_STATE_DIR", "state directory (/var/lib/qudata-agent)"),
    ("QUDATA_PORT_RANGE", "host ports handed to instances (40000-49999)"),
    ("QUDATA_FIXED_PORTS", "fixed host ports an order may ask for (1024-65535)"),
    ("QUDATA_ADDRESS", "public address reported (looked up, else the default route's)"),
    ("QUDATA_ADDRESS_LOOKUP_URLS", "'what is my IP' services, comma-separated, or none"),
    ("DOCKER_HOST", "Docker engine (unix:///var/run/docker.sock)"),
    ("QUDATA_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR (INFO)"),
    ("QUDATA_LOG_FORMAT", "json or text (json)"),
    ("QUDATA_LOG_FILE", "also log to this file, rotated"),
    ("QUDATA_LOG_FILE_MAX_MB", "size of one log file before it rotates (50)"),
    ("QUDATA_CP_TIMEOUT", "seconds per control-plane call (10)"),
    ("QUDATA_CP_BACKOFF_MAX", "cap of the control-plane retry delay, seconds (60)"),
    ("QUDATA_SHUTDOWN_TIMEOUT", "seconds given to requests and loops on stop (5)"),
    ("QUDATA_PULL_INACTIVITY_TIMEOUT", "abort a pull without progress for this long (300)"),
    ("QUDATA_STOP_TIMEOUT", "SIGTERM to SIGKILL when stopping an instance, seconds (10)"),
    ("QUDATA_SYNC_INTERVAL", "seconds between full reconciles with Docker (30)"),
    ("QUDATA_NETWORK", "the Docker network of instances (qudata)"),
    ("QUDATA_BRIDGE", "its bridge (qudata0)"),
    ("QUDATA_FIREWALL", "wall instances off from the host and private ranges (on)"),
    ("QUDATA_EGRESS_ALLOW", "private networks instances may still reach"),
    ("QUDATA_NET_MBPS_DEFAULT", "cap of each instance's download and upload, Mbit/s (none)"),
    ("QUDATA_EGRESS_BLOCK_PORTS", "outbound TCP ports refused to instances (25)"),
    ("QUDATA_EGRESS_DENY", "networks instances may not reach, comma-separated CIDRs"),
    ("QUDATA_EGRESS_CONN_RATE", "new outbound connections a second per instance (200)"),
    ("QUDATA_TUNNEL", "wireguard: rentable behind NAT through a relay (off)"),
    ("QUDATA_TUNNEL_ENDPOINT", "the relay's WireGuard, RELAY:PORT"),
    ("QUDATA_TUNNEL_RELAY_KEY", "the relay's WireGuard public key"),
    ("QUDATA_TUNNEL_ADDRESS", "this host's tunnel address, CIDR"),
    ("QUDATA_TUNNEL_PUBLIC_ADDRESS", "the relay's public IPv4 (reported as the address)"),
    ("QUDATA_TUNNEL_INTERFACE", "the tunnel's interface (qudata-wg)"),
    ("QUDATA_TUNNEL_TABLE", "routing table of the tunnel's replies (51820)"),
    ("QUDATA_TUNNEL_MARK", "fwmark bit(s) of connections from the tunnel (0x80000)"),
    ("QUDATA_INVENTORY_INTERVAL", "seconds between inventory checks (300)"),
    ("QUDATA_STORAGE_POLICY", "monitor or refuse storage_gb where it cannot be capped"),
    ("QUDATA_STORAGE_CHECK_INTERVAL", "seconds between layer measurements (60)"),
    ("QUDATA_DEFAULT_STORAGE_GB", "storage_gb of an order naming none (its share of free disk)"),
    ("QUDATA_CRASH_RESTARTS", "restarts of a crashing command before it is left error (5)"),
    ("QUDATA_CONTAINER_LOG_MB", "each container's log, rotated files together, MB (100)"),
    ("QUDATA_MAX_INSTANCES", "instances the host may run at once (1)"),
    ("QUDATA_RESERVED_CPU_CORES", "CPUs kept back for the host (1)"),
    ("QUDATA_RESERVED_MEMORY_GB", "memory kept back for the host, GiB (2)"),
    ("QUDATA_IMAGE_GC_FREE_GB", "remove unused images while Docker's disk has less free (20)"),
    ("QUDATA_IMAGE_CACHE_GB", "and while the agent's images total more than this"),
    ("QUDATA_IMAGE_GC_INTERVAL", "seconds between image GC passes (600)"),
    ("QUDATA_PREPULL", "images pulled after start and kept, comma-separated"),
    ("QUDATA_PREPULL_INTERVAL", "seconds between checks of the pre-pull list (86400)"),
    ("QUDATA_REGISTRY_ALLOW", "local or private registries Docker may be sent to, host:port"),
    ("QUDATA_METRICS_LISTEN", "loopback HOST:PORT serving /metrics without the secret"),
    ("QUDATA_TLS", "on (TLS and plain HTTP on the API port), required or off (on)"),
    ("QUDATA_TLS_CERT_FILE", "the provider's own certificate (else the agent makes one)"),
    ("QUDATA_TLS_KEY_FILE", "its private key (PEM, unencrypted)"),
    ("QUDATA_TLS_CLIENT_CA", "mutual TLS: serve only clients with a certificate from this CA"),
    ("QUDATA_HTTP_HEADER_TIMEOUT", "seconds a connection has for its request headers (10)"),
    ("QUDATA_HTTP_MAX_CONNECTIONS", "connections open at once on the API port (256)"),
    ("QUDATA_SANDBOX_RUNTIME", "Docker's runtime name for isolation 'sandbox' (runsc)"),
    ("QUDATA_NVIDIA_TOOLKIT_MIN", "raise the NVIDIA Container Toolkit floor for GPU orders"),
    ("QUDATA_CONFIG_FILE", "KEY=VALUE file read first (the environment wins)"),
)
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
    width = max(len(name) for name, _ in SETTINGS_HELP) + 2
    epilog = "settings (environment, or KEY=VALUE lines in --config FILE):\n"
    epilog += "".join(f"  {name:<{width}}{meaning}\n" for name, meaning in SETTINGS_HELP)
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
