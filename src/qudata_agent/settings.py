"""What the agent can be told: each setting declared once, as one field of `Settings`.

A field names its environment variable, its type and default, the parser that
checks a value (config_values.py) and one line on what it means. `run --help`
is made from these fields, and a unit test holds the README's Configuration
table to them (each variable once, in this order, with this default). config.py
reads the values; nothing here touches the environment.

What stays true: `Settings` is frozen and its defaults follow CONTRACT.md
section 3; a default shown as a literal parses to the field's default; the API
key is never part of a repr.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypeVar

from qudata_agent import config_values as v
from qudata_agent.domain.storage import StoragePolicy
from qudata_agent.domain.tls import TlsMode
from qudata_agent.domain.tunnel import (
    parse_address,
    parse_endpoint,
    parse_key,
    parse_public_address,
)

T = TypeVar("T")

DEFAULT_API_URL = "https://internal.qudata.ai/v0"
DEFAULT_STATE_DIR = "/var/lib/qudata-agent"
DEFAULT_PORT_RANGE = (40000, 49999)
# "What is my IP" services asked for the public address when QUDATA_ADDRESS is not set.
DEFAULT_ADDRESS_LOOKUP_URLS = ("https://api.ipify.org", "https://checkip.amazonaws.com")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("json", "text")
_VAR = "qudata.setting"


@dataclass(frozen=True)
class Var:
    """How one setting is given: its variable, its parser and what it means."""

    env: str
    parse: Callable[[str, str], object]
    about: str  # one line, for `run --help`
    shown: str = ""  # the README's default where the value alone says too little


def _setting(
    env: str, parse: v.Parse[T], about: str, *, default: T, shown: str = "", secret: bool = False
) -> T:
    return field(default=default, repr=not secret, metadata={_VAR: Var(env, parse, about, shown)})


def _s(seconds: float, lo: float, hi: float, env: str, about: str) -> float:
    """A duration in seconds (most settings that end in _s)."""
    return _setting(env, v.number(lo, hi), about, default=seconds)


@dataclass(frozen=True)
class Settings:
    api_key: str | None = _setting(
        "QUDATA_API_KEY",
        v.api_key,
        "control-plane API key (none: standalone); kept in STATE_DIR/api_key",
        default=None,
        shown="none (standalone)",
        secret=True,
    )
    api_url: str = _setting(
        "QUDATA_API_URL", v.url, "control-plane base URL", default=DEFAULT_API_URL
    )
    agent_host: str = _setting(
        "QUDATA_AGENT_HOST", v.text, "address the API listens on", default="0.0.0.0"
    )
    agent_port: int | None = _setting(
        "QUDATA_AGENT_PORT",
        v.integer(1, 65535),
        "API port (previous one, else the first free from 1024)",
        default=None,
        shown="previous port, else first free from 1024 (`install.sh` writes 1024: a fixed"
        " port for firewall rules)",
    )
    state_dir: Path = _setting(
        "QUDATA_STATE_DIR", v.absolute_path, "state directory", default=Path(DEFAULT_STATE_DIR)
    )
    port_range: tuple[int, int] = _setting(
        "QUDATA_PORT_RANGE",
        v.port_range,
        "host ports handed to instances",
        default=DEFAULT_PORT_RANGE,
        shown="`40000-49999`",
    )
    fixed_ports: tuple[int, int] = _setting(
        "QUDATA_FIXED_PORTS",
        v.port_range,
        "fixed host ports an order may ask for",
        default=(1024, 65535),
        shown="`1024-65535`",
    )
    address: str | None = _setting(
        "QUDATA_ADDRESS",
        v.text,
        "public address reported (looked up, else the default route's)",
        default=None,
        shown="looked up, else default-route IPv4",
    )
    address_lookup_urls: tuple[str, ...] = _setting(
        "QUDATA_ADDRESS_LOOKUP_URLS",
        v.url_list,
        "'what is my IP' services, comma-separated, or none",
        default=DEFAULT_ADDRESS_LOOKUP_URLS,
    )
    docker_host: str | None = _setting(
        "DOCKER_HOST", v.text, "Docker engine", default=None, shown="`unix:///var/run/docker.sock`"
    )
    log_level: str = _setting(
        "QUDATA_LOG_LEVEL", v.choice(*LOG_LEVELS), "DEBUG, INFO, WARNING or ERROR", default="INFO"
    )
    log_format: str = _setting(
        "QUDATA_LOG_FORMAT", v.choice(*LOG_FORMATS), "json or text", default="json"
    )
    cp_timeout_s: float = _s(10.0, 0.1, 300, "QUDATA_CP_TIMEOUT", "seconds per control-plane call")
    cp_backoff_max_s: float = _s(
        60.0, 0.1, 3600, "QUDATA_CP_BACKOFF_MAX", "cap of the control-plane retry delay, seconds"
    )
    shutdown_timeout_s: float = _s(
        5.0, 0.1, 60, "QUDATA_SHUTDOWN_TIMEOUT", "seconds given to requests and loops on stop"
    )
    pull_inactivity_s: float = _s(
        300.0,
        1,
        3600,
        "QUDATA_PULL_INACTIVITY_TIMEOUT",
        "abort a pull without progress for this long, seconds",
    )
    stop_timeout_s: int = _setting(
        "QUDATA_STOP_TIMEOUT",
        v.integer(0, 600),
        "SIGTERM to SIGKILL when stopping an instance, seconds",
        default=10,
    )
    sync_interval_s: float = _s(
        30.0, 1, 3600, "QUDATA_SYNC_INTERVAL", "seconds between full reconciles with Docker"
    )
    log_file: Path | None = _setting(
        "QUDATA_LOG_FILE", v.absolute_path, "also log to this file, rotated", default=None
    )
    log_file_max_mb: int = _setting(
        "QUDATA_LOG_FILE_MAX_MB",
        v.integer(1, 10240),
        "MB of one log file before it rotates; 3 old files are kept",
        default=50,
    )
    network: str = _setting(
        "QUDATA_NETWORK", v.docker_name, "the Docker network instances run on", default="qudata"
    )
    bridge: str = _setting(
        "QUDATA_BRIDGE", v.interface, "its Linux bridge, named by the firewall", default="qudata0"
    )
    firewall: bool = _setting(
        "QUDATA_FIREWALL",
        v.switch,
        "wall instances off from the host and private ranges",
        default=True,
    )
    egress_allow: tuple[str, ...] = _setting(
        "QUDATA_EGRESS_ALLOW",
        v.networks,
        "private networks instances may still reach, comma-separated",
        default=(),
    )
    # Network use (CONTRACT.md section 8).
    net_mbps_default: float | None = _setting(
        "QUDATA_NET_MBPS_DEFAULT",
        v.mbps,
        "cap of each instance's download and upload, Mbit/s",
        default=None,
    )
    egress_block_ports: tuple[int, ...] = _setting(
        "QUDATA_EGRESS_BLOCK_PORTS",
        v.tcp_ports,
        "outbound TCP ports refused to instances",
        default=(25,),
    )
    egress_deny: tuple[str, ...] = _setting(
        "QUDATA_EGRESS_DENY",
        v.networks,
        "networks instances may not reach, comma-separated CIDRs",
        default=(),
    )
    egress_conn_rate: int = _setting(
        "QUDATA_EGRESS_CONN_RATE",
        v.integer(0, 1_000_000),
        "new outbound connections a second per instance",
        default=200,
    )
    inventory_interval_s: float = _s(
        300.0, 1, 86400, "QUDATA_INVENTORY_INTERVAL", "seconds between inventory checks"
    )
    storage_policy: StoragePolicy = _setting(
        "QUDATA_STORAGE_POLICY",
        v.member(StoragePolicy),
        "monitor or refuse storage_gb where it cannot be capped",
        default=StoragePolicy.MONITOR,
    )
    storage_check_interval_s: float = _s(
        60.0, 1, 86400, "QUDATA_STORAGE_CHECK_INTERVAL", "seconds between layer measurements"
    )
    default_storage_gb: float | None = _setting(
        "QUDATA_DEFAULT_STORAGE_GB",
        v.number(0.01, 1e6),
        "storage_gb of an order naming none (its share of free disk)",
        default=None,
        shown="the order's share of the free disk",
    )
    crash_restarts: int = _setting(
        "QUDATA_CRASH_RESTARTS",
        v.integer(0, 100),
        "restarts of a crashing command before it is left error",
        default=5,
    )
    container_log_mb: int = _setting(
        "QUDATA_CONTAINER_LOG_MB",
        v.integer(1, 10240),
        "each container's log, rotated files together, MB",
        default=100,
    )
    # CONTRACT.md section 4
    max_instances: int = _setting(
        "QUDATA_MAX_INSTANCES",
        v.integer(1, 256),
        "instances the host may run at once",
        default=1,
    )
    reserved_cpu_cores: float = _setting(
        "QUDATA_RESERVED_CPU_CORES", v.number(0, 1024), "CPUs kept back for the host", default=1.0
    )
    reserved_memory_gb: float = _setting(
        "QUDATA_RESERVED_MEMORY_GB",
        v.number(0, 65536),
        "memory kept back for the host, GiB",
        default=2.0,
    )
    image_gc_free_gb: float = _setting(
        "QUDATA_IMAGE_GC_FREE_GB",
        v.number(0, 1e6),
        "remove unused images while Docker's disk has less free, GB",
        default=20.0,
    )
    image_cache_gb: float | None = _setting(
        "QUDATA_IMAGE_CACHE_GB",
        v.number(0, 1e6),
        "and while the agent's images total more than this",
        default=None,
    )
    image_gc_interval_s: float = _s(
        600.0, 1, 86400, "QUDATA_IMAGE_GC_INTERVAL", "seconds between image GC passes"
    )
    prepull: tuple[str, ...] = _setting(
        "QUDATA_PREPULL",
        v.images,
        "images pulled after start and kept, comma-separated",
        default=(),
    )
    prepull_interval_s: float = _s(
        86400.0,
        1,
        30 * 86400,
        "QUDATA_PREPULL_INTERVAL",
        "seconds between checks of the pre-pull list",
    )
    # Tunnel mode (hosts behind NAT, CONTRACT.md section 6); each field but the mode
    # may instead come from the /init answer.
    tunnel: str | None = _setting(
        "QUDATA_TUNNEL",
        v.tunnel_mode,
        "wireguard: rentable behind NAT through a relay, or off",
        default=None,
        shown="`off`",
    )
    tunnel_endpoint: str | None = _setting(
        "QUDATA_TUNNEL_ENDPOINT",
        v.checked_by(parse_endpoint),
        "the relay's WireGuard, RELAY:PORT",
        default=None,
        shown="from `/init`",
    )
    tunnel_relay_key: str | None = _setting(
        "QUDATA_TUNNEL_RELAY_KEY",
        v.checked_by(parse_key),
        "the relay's WireGuard public key",
        default=None,
        shown="from `/init`",
    )
    tunnel_address: str | None = _setting(
        "QUDATA_TUNNEL_ADDRESS",
        v.checked_by(parse_address),
        "this host's tunnel address, CIDR",
        default=None,
        shown="from `/init`",
    )
    tunnel_public_address: str | None = _setting(
        "QUDATA_TUNNEL_PUBLIC_ADDRESS",
        v.checked_by(parse_public_address),
        "the relay's public IPv4 (reported as the address)",
        default=None,
        shown="from `/init`",
    )
    tunnel_interface: str = _setting(
        "QUDATA_TUNNEL_INTERFACE", v.interface, "the tunnel's interface", default="qudata-wg"
    )
    tunnel_table: int = _setting(
        "QUDATA_TUNNEL_TABLE",
        v.integer(1, 2**31 - 1),
        "the routing table of replies that leave through the tunnel",
        default=51820,
    )
    tunnel_mark: int = _setting(
        "QUDATA_TUNNEL_MARK",
        v.mark,
        "the fwmark bit(s) of connections that came in through it",
        default=0x80000,
        shown="`0x80000`",
    )
    registry_allow: frozenset[str] = _setting(
        "QUDATA_REGISTRY_ALLOW",
        v.registries,
        "local or private registries Docker may be sent to, host:port",
        default=frozenset(),
    )
    metrics_listen: tuple[str, int] | None = _setting(
        "QUDATA_METRICS_LISTEN",
        v.loopback_listen,
        "loopback HOST:PORT serving /metrics without the secret",
        default=None,
        shown="none (off)",
    )
    # The agent's port (CONTRACT.md section 5).
    tls: TlsMode = _setting(
        "QUDATA_TLS",
        v.member(TlsMode),
        "on (TLS and plain HTTP on the API port), required or off",
        default=TlsMode.ON,
    )
    tls_cert_file: Path | None = _setting(
        "QUDATA_TLS_CERT_FILE",
        v.absolute_path,
        "the provider's own certificate (else the agent makes one)",
        default=None,
    )
    tls_key_file: Path | None = _setting(
        "QUDATA_TLS_KEY_FILE", v.absolute_path, "its private key (PEM, unencrypted)", default=None
    )
    tls_client_ca: Path | None = _setting(
        "QUDATA_TLS_CLIENT_CA",
        v.absolute_path,
        "mutual TLS: serve only clients with a certificate from this CA",
        default=None,
    )
    http_header_timeout_s: float = _s(
        10.0,
        0.1,
        300,
        "QUDATA_HTTP_HEADER_TIMEOUT",
        "seconds a connection has for its request headers",
    )
    http_max_connections: int = _setting(
        "QUDATA_HTTP_MAX_CONNECTIONS",
        v.integer(16, 65536),
        "connections open at once on the API port",
        default=256,
    )
    sandbox_runtime: str = _setting(
        "QUDATA_SANDBOX_RUNTIME",
        v.runtime,
        "Docker's runtime name for isolation 'sandbox', gVisor's",
        default="runsc",
    )
    nvidia_toolkit_min: tuple[int, int, int] | None = _setting(
        "QUDATA_NVIDIA_TOOLKIT_MIN",
        v.version,
        "raise the NVIDIA Container Toolkit floor for GPU orders",
        default=None,
        shown="`1.17.8` (the last confirmed fix)",
    )
    config_file: Path | None = _setting(
        "QUDATA_CONFIG_FILE",
        v.any_path,
        "KEY=VALUE file read first (the environment wins)",
        default=None,
    )
    max_body_bytes: int = 1024 * 1024  # fixed: the largest request body the API reads
    # Set by systemd (config.py reads them; they are not settings): the sd_notify
    # socket, the watchdog timeout, journald on stderr.
    notify_socket: str | None = None
    watchdog_usec: int | None = None
    journal_stream: str | None = None

    @property
    def standalone(self) -> bool:
        """No API key: the agent makes no outbound calls and owns its secret."""
        return not self.api_key


def declared() -> list[tuple[str, Var, object]]:
    """Each setting in declaration order: its field name, how it is given, its default."""
    return [(f.name, f.metadata[_VAR], f.default) for f in fields(Settings) if _VAR in f.metadata]


def literal(var: Var, default: object) -> str | None:
    """The default as it would be written in the variable; None where there is none."""
    if var.shown:
        return var.shown[1:-1] if re.fullmatch(r"`[^`]+`", var.shown) else None
    if default is None or default in ((), frozenset()):
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    if isinstance(default, tuple):
        return ",".join(str(item) for item in default)
    return str(default)


def help_rows() -> list[tuple[str, str]]:
    """(variable, meaning and default) for `run --help`."""
    rows = []
    for _name, var, default in declared():
        value = literal(var, default)
        rows.append((var.env, f"{var.about} ({value})" if value else var.about))
    return rows


def readme_default(var: Var, default: object) -> str:
    """The README table's Default cell."""
    value = literal(var, default)
    return var.shown or (f"`{value}`" if value else "none")
