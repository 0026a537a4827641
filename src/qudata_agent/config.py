"""Settings: the one place that reads the process environment.

Everything the agent can be told comes in here once, at start, from three
sources in rising priority: an optional env-style config file, the environment,
and the command line. The result is a frozen `Settings` that is passed down
explicitly; nothing else in the package reads `os.environ`.

What stays true:
- a bad value fails the start with a `ConfigError` that names the variable and
  says what was expected; a secret's value is never part of that message;
- defaults follow CONTRACT.md section 3.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from qudata_agent.domain.firewall import parse_allow_list
from qudata_agent.domain.image_ref import resolve_image
from qudata_agent.domain.netpolicy import MAX_MBPS, MIN_MBPS, parse_ports
from qudata_agent.domain.nvidia_toolkit import parse_floor
from qudata_agent.domain.registry_hosts import parse_allow_list as parse_registry_allow
from qudata_agent.domain.storage import StoragePolicy
from qudata_agent.domain.tls import TlsMode
from qudata_agent.domain.tunnel import (
    TunnelConfigError,
    parse_address,
    parse_endpoint,
    parse_key,
    parse_public_address,
)
from qudata_agent.errors import InvalidRequest

PREFIX = "QUDATA_"
DEFAULT_API_URL = "https://internal.qudata.ai/v0"
DEFAULT_STATE_DIR = "/var/lib/qudata-agent"
DEFAULT_PORT_RANGE = (40000, 49999)
# "What is my IP" services asked for the public address when QUDATA_ADDRESS is not set.
DEFAULT_ADDRESS_LOOKUP_URLS = ("https://api.ipify.org", "https://checkip.amazonaws.com")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("json", "text")
# What systemd tells a service it starts (never read from the config file).
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")
# Variables whose values are secrets: never echoed in an error.
_SECRET_VARS = frozenset({"QUDATA_API_KEY"})


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    api_key: str | None = field(default=None, repr=False)
    api_url: str = DEFAULT_API_URL
    agent_host: str = "0.0.0.0"
    agent_port: int | None = None  # None: the first free port from 1024 (previous one preferred)
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    fixed_ports: tuple[int, int] = (1024, 65535)  # fixed host ports an order may ask for
    address: str | None = None
    docker_host: str | None = None
    log_level: str = "INFO"
    log_format: str = "json"
    log_file: Path | None = None  # also log to this file, rotated by size
    log_file_max_mb: int = 50  # rotate the log file at this size (3 old files kept)
    config_file: Path | None = None  # QUDATA_CONFIG_FILE, as given (for doctor and status)
    cp_timeout_s: float = 10.0
    cp_backoff_max_s: float = 60.0
    shutdown_timeout_s: float = 5.0
    max_body_bytes: int = 1024 * 1024
    pull_inactivity_s: float = 300.0  # a pull with no progress for this long is aborted
    stop_timeout_s: int = 10  # SIGTERM -> SIGKILL grace when stopping an instance
    sync_interval_s: float = 30.0  # full reconcile with Docker
    address_lookup_urls: tuple[str, ...] = DEFAULT_ADDRESS_LOOKUP_URLS  # () : no lookups
    inventory_interval_s: float = 300.0  # re-read the inventory; resend it when it changed
    network: str = "qudata"  # the Docker network instances run on
    bridge: str = "qudata0"  # its Linux bridge (the firewall rules name it)
    firewall: bool = True  # wall instances off from the host and private ranges
    egress_allow: tuple[str, ...] = ()  # private networks instances may still reach
    # Network use (CONTRACT.md section 8): the host's cap per instance, each direction
    # (None: none), outbound TCP ports refused, networks refused, new connections a second.
    net_mbps_default: float | None = None
    egress_block_ports: tuple[int, ...] = (25,)
    egress_deny: tuple[str, ...] = ()
    egress_conn_rate: int = 200
    # Where Docker cannot cap a container's size: refuse storage_gb, or accept and watch it.
    storage_policy: StoragePolicy = StoragePolicy.MONITOR
    storage_check_interval_s: float = 60.0  # how often an uncapped writable layer is measured
    default_storage_gb: float | None = None  # storage_gb of an order naming none; None: a share
    crash_restarts: int = 5  # a crashing command is restarted this often, then left `error`
    container_log_mb: int = 100  # each container's log, all rotated files together
    max_instances: int = 1  # instances the host may run at once (CONTRACT.md section 4)
    reserved_cpu_cores: float = 1.0  # CPUs kept back from instances for the host itself
    reserved_memory_gb: float = 2.0  # GiB of memory kept back likewise
    # The image cache: unused images go (least recently used first) while Docker's data
    # root has less free than this (0: never for free space) or, when set, while the
    # cached images total more than image_cache_gb.
    image_gc_free_gb: float = 20.0
    image_cache_gb: float | None = None
    image_gc_interval_s: float = 600.0
    prepull: tuple[str, ...] = ()  # image references pulled after start, kept in the cache
    # Registries on loopback, private or this host's addresses Docker may be sent to (host:port).
    registry_allow: frozenset[str] = frozenset()
    prepull_interval_s: float = 86400.0  # how often the pre-pull list is checked again
    # Optional Prometheus listener without the secret (host, port); None: off.
    metrics_listen: tuple[str, int] | None = None
    # Tunnel mode (hosts behind NAT, CONTRACT.md section 6): "wireguard" or None (off).
    # The fields: relay:port, the relay's public key, this host's tunnel address (CIDR),
    # the relay's public IPv4; each may instead come from the /init answer.
    tunnel: str | None = None
    tunnel_endpoint: str | None = None
    tunnel_relay_key: str | None = None
    tunnel_address: str | None = None
    tunnel_public_address: str | None = None
    tunnel_interface: str = "qudata-wg"
    tunnel_table: int = 51820  # the routing table of replies that leave through the tunnel
    tunnel_mark: int = 0x80000  # the fwmark bit(s) of connections that came in through it
    # The agent's port (CONTRACT.md section 5): TLS, the provider's own certificate and key
    # (else one the agent makes), mutual TLS, and what a stranger may hold.
    tls: TlsMode = TlsMode.ON
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca: Path | None = None
    http_header_timeout_s: float = 10.0
    http_max_connections: int = 256
    sandbox_runtime: str = "runsc"  # Docker's runtime name for the sandbox tier (gVisor)
    nvidia_toolkit_min: tuple[int, int, int] | None = None  # raises the toolkit floor
    # Set by systemd: the sd_notify socket, the watchdog timeout, journald on stderr.
    notify_socket: str | None = None
    watchdog_usec: int | None = None
    journal_stream: str | None = None

    @property
    def standalone(self) -> bool:
        """No API key: the agent makes no outbound calls and owns its secret."""
        return not self.api_key


def _parse_int(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}: expected an integer {lo}-{hi}, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: expected an integer {lo}-{hi}, got {value}")
    return value


def _parse_float(name: str, raw: str, lo: float, hi: float) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}: expected a number {lo}-{hi}, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: expected a number {lo}-{hi}, got {value}")
    return value


def _parse_port_range(name: str, raw: str) -> tuple[int, int]:
    lo_s, sep, hi_s = raw.strip().partition("-")
    if not sep:
        raise ConfigError(f"{name}: expected FIRST-LAST (e.g. 40000-49999), got {raw!r}")
    lo = _parse_int(name, lo_s, 1, 65535)
    hi = _parse_int(name, hi_s, 1, 65535)
    if lo > hi:
        raise ConfigError(f"{name}: first port {lo} is above last port {hi}")
    return lo, hi


def _parse_url(name: str, raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name}: expected an http(s) URL, got {raw!r}")
    return raw.strip().rstrip("/")


def _parse_url_list(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated http(s) URLs; "none" turns the lookups off."""
    if raw.strip().lower() == "none":
        return ()
    return tuple(_parse_url(name, item) for item in raw.split(",") if item.strip())


def _parse_choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.strip()
    for choice in choices:
        if value.lower() == choice.lower():
            return choice
    raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")


def _parse_state_dir(name: str, raw: str) -> Path:
    path = Path(raw.strip())
    if not raw.strip() or not path.is_absolute():
        raise ConfigError(f"{name}: expected an absolute path, got {raw!r}")
    return path


def _parse_api_key(name: str, raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(f"{name}: the API key holds whitespace or control characters")
    return value


def _parse_name(name: str, raw: str) -> str:
    if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}", raw):
        raise ConfigError(f"{name}: expected a Docker network name, got {raw!r}")
    return raw


def _parse_bridge(name: str, raw: str) -> str:
    if not re.fullmatch(r"[a-zA-Z0-9_.-]{1,15}", raw):
        raise ConfigError(f"{name}: expected an interface name of at most 15 chars, got {raw!r}")
    return raw


def _parse_runtime(name: str, raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}", value) or value == "runc":
        raise ConfigError(f"{name}: expected a Docker runtime name other than runc, got {raw!r}")
    return value


def _parse_version(name: str, raw: str) -> tuple[int, int, int]:
    try:
        return parse_floor(raw)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None


def _parse_switch(name: str, raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ConfigError(f"{name}: expected on or off, got {raw!r}")


def _parse_networks(name: str, raw: str) -> tuple[str, ...]:
    try:
        return parse_allow_list(raw)
    except ValueError as e:
        raise ConfigError(f"{name}: expected comma-separated networks (CIDR): {e}") from None


def _parse_ports(name: str, raw: str) -> tuple[int, ...]:
    try:
        return parse_ports(raw)
    except ValueError as e:
        raise ConfigError(f"{name}: expected comma-separated TCP ports or none: {e}") from None


def _parse_mbps(name: str, raw: str) -> float | None:
    if raw.strip().lower() in ("none", "off"):
        return None
    return _parse_float(name, raw, MIN_MBPS, MAX_MBPS)


def _parse_images(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated image references, each as the agent will pull it ("busybox:latest")."""
    refs = []
    for item in raw.split(","):
        if item.strip():
            try:
                refs.append(str(resolve_image(item.strip(), None)))
            except InvalidRequest as e:
                problem = e.message.removeprefix("field 'image': ")
                raise ConfigError(f"{name}: {item.strip()!r}: {problem}") from None
    return tuple(dict.fromkeys(refs))


def _parse_registries(name: str, raw: str) -> frozenset[str]:
    try:
        return parse_registry_allow(raw)
    except ValueError as e:
        raise ConfigError(f"{name}: expected comma-separated host:port entries: {e}") from None


def read_env_file(path: Path) -> dict[str, str]:
    """Reads KEY=VALUE lines (comments, blank lines and `export ` allowed)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot be read ({e.strerror})") from e
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"config file {path}, line {number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    config_file: Path | None = None,
    api_key: str | None = None,
) -> Settings:
    """Builds Settings from a config file, then the environment, then arguments."""
    env: dict[str, str] = {}
    source = os.environ if environ is None else environ
    file_name = source.get("QUDATA_CONFIG_FILE")
    if config_file is None and file_name:
        config_file = Path(file_name)
    if config_file is not None:
        env.update(read_env_file(config_file))
    env.update({k: v for k, v in source.items() if k.startswith(PREFIX) or k == "DOCKER_HOST"})
    if api_key is not None:
        env["QUDATA_API_KEY"] = api_key
    for var in _SYSTEMD_VARS:
        env.pop(var, None)
        if source.get(var):
            env[var] = source[var]
    return _from_mapping(env)


def _parse_listen(name: str, raw: str) -> tuple[str, int] | None:
    value = raw.strip()
    if value.lower() in ("", "off", "none"):
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ConfigError(f"{name}: expected HOST:PORT (e.g. 127.0.0.1:9101), got {raw!r}")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:  # it needs no secret: it must not be reachable from elsewhere
        raise ConfigError(f"{name}: expected a loopback address (127.0.0.1 or ::1), got {host!r}")
    return host, _parse_int(name, port, 1, 65535)


def _parse_tunnel_field(
    parse: Callable[[str, str], object],
) -> Callable[[str, str], str]:
    """Checks a tunnel field with the domain's parser; keeps the text (normalised)."""

    def check(name: str, raw: str) -> str:
        try:
            parse(name, raw)
        except TunnelConfigError as e:
            raise ConfigError(str(e)) from None
        return raw.strip()

    return check


def _parse_mark(name: str, raw: str) -> int:
    try:
        value = int(raw.strip(), 0)
    except ValueError:
        raise ConfigError(f"{name}: expected a number (e.g. 0x80000), got {raw!r}") from None
    if not 0 < value < 2**32:
        raise ConfigError(f"{name}: expected a nonzero 32-bit mark, got {raw!r}")
    return value


_TUNNEL_PARSERS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "QUDATA_TUNNEL": ("tunnel", lambda n, r: _parse_choice(n, r, ("wireguard", "off"))),
    "QUDATA_TUNNEL_ENDPOINT": ("tunnel_endpoint", _parse_tunnel_field(parse_endpoint)),
    "QUDATA_TUNNEL_RELAY_KEY": ("tunnel_relay_key", _parse_tunnel_field(parse_key)),
    "QUDATA_TUNNEL_ADDRESS": ("tunnel_address", _parse_tunnel_field(parse_address)),
    "QUDATA_TUNNEL_PUBLIC_ADDRESS": (
        "tunnel_public_address",
        _parse_tunnel_field(parse_public_address),
    ),
    "QUDATA_TUNNEL_INTERFACE": ("tunnel_interface", _parse_bridge),
    "QUDATA_TUNNEL_TABLE": ("tunnel_table", lambda n, r: _parse_int(n, r, 1, 2**31 - 1)),
    "QUDATA_TUNNEL_MARK": ("tunnel_mark", _parse_mark),
}


def _check_agent_port(settings: Settings) -> None:
    """Outside the instances' range; in tunnel mode inside it (the relay forwards only it)."""
    if settings.agent_port is None:
        return
    lo, hi = settings.port_range
    inside = lo <= settings.agent_port <= hi
    if inside and not settings.tunnel:
        raise ConfigError(
            f"QUDATA_AGENT_PORT: {settings.agent_port} lies inside QUDATA_PORT_RANGE {lo}-{hi}"
        )
    if settings.tunnel and not inside:
        raise ConfigError(
            f"QUDATA_AGENT_PORT: in tunnel mode it must lie inside QUDATA_PORT_RANGE {lo}-{hi}"
            " (the relay forwards only that block)"
        )


def _systemd(env: Mapping[str, str]) -> dict[str, object]:
    """NOTIFY_SOCKET, WATCHDOG_USEC (for this process only) and JOURNAL_STREAM."""
    found: dict[str, object] = {}
    if env.get("NOTIFY_SOCKET", "").strip():
        found["notify_socket"] = env["NOTIFY_SOCKET"].strip()
    pid = env.get("WATCHDOG_PID", "").strip()
    usec = env.get("WATCHDOG_USEC", "").strip()
    if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
        found["watchdog_usec"] = int(usec)
    if env.get("JOURNAL_STREAM", "").strip():
        found["journal_stream"] = env["JOURNAL_STREAM"].strip()
    return found


def _check_tls(settings: Settings) -> None:
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise ConfigError(
            "QUDATA_TLS_CERT_FILE and QUDATA_TLS_KEY_FILE: give both (the provider's own "
            "certificate and its key) or neither (the agent makes its own)"
        )
    if settings.tls is TlsMode.OFF and settings.tls_client_ca is not None:
        raise ConfigError("QUDATA_TLS_CLIENT_CA: mutual TLS needs TLS, but QUDATA_TLS is off")


def _from_mapping(env: Mapping[str, str]) -> Settings:
    kwargs: dict[str, object] = {}
    parsers: dict[str, tuple[str, Callable[[str, str], object]]] = {
        "QUDATA_API_KEY": ("api_key", _parse_api_key),
        "QUDATA_API_URL": ("api_url", _parse_url),
        "QUDATA_AGENT_PORT": ("agent_port", lambda n, r: _parse_int(n, r, 1, 65535)),
        "QUDATA_STATE_DIR": ("state_dir", _parse_state_dir),
        "QUDATA_PORT_RANGE": ("port_range", _parse_port_range),
        "QUDATA_FIXED_PORTS": ("fixed_ports", _parse_port_range),
        "QUDATA_LOG_LEVEL": ("log_level", lambda n, r: _parse_choice(n, r, LOG_LEVELS)),
        "QUDATA_LOG_FORMAT": ("log_format", lambda n, r: _parse_choice(n, r, LOG_FORMATS)),
        "QUDATA_LOG_FILE": ("log_file", _parse_state_dir),  # an absolute path
        "QUDATA_LOG_FILE_MAX_MB": ("log_file_max_mb", lambda n, r: _parse_int(n, r, 1, 10240)),
        "QUDATA_CONFIG_FILE": ("config_file", lambda n, r: Path(r.strip())),
        "QUDATA_CP_TIMEOUT": ("cp_timeout_s", lambda n, r: _parse_float(n, r, 0.1, 300)),
        "QUDATA_CP_BACKOFF_MAX": ("cp_backoff_max_s", lambda n, r: _parse_float(n, r, 0.1, 3600)),
        "QUDATA_PULL_INACTIVITY_TIMEOUT": (
            "pull_inactivity_s",
            lambda n, r: _parse_float(n, r, 1, 3600),
        ),
        "QUDATA_STOP_TIMEOUT": ("stop_timeout_s", lambda n, r: _parse_int(n, r, 0, 600)),
        "QUDATA_SYNC_INTERVAL": ("sync_interval_s", lambda n, r: _parse_float(n, r, 1, 3600)),
        "QUDATA_ADDRESS_LOOKUP_URLS": ("address_lookup_urls", _parse_url_list),
        "QUDATA_INVENTORY_INTERVAL": (
            "inventory_interval_s",
            lambda n, r: _parse_float(n, r, 1, 86400),
        ),
        "QUDATA_SHUTDOWN_TIMEOUT": (
            "shutdown_timeout_s",
            lambda n, r: _parse_float(n, r, 0.1, 60),
        ),
        "QUDATA_NETWORK": ("network", _parse_name),
        "QUDATA_BRIDGE": ("bridge", _parse_bridge),
        "QUDATA_FIREWALL": ("firewall", _parse_switch),
        "QUDATA_EGRESS_ALLOW": ("egress_allow", _parse_networks),
        "QUDATA_NET_MBPS_DEFAULT": ("net_mbps_default", _parse_mbps),
        "QUDATA_EGRESS_BLOCK_PORTS": ("egress_block_ports", _parse_ports),
        "QUDATA_EGRESS_DENY": ("egress_deny", _parse_networks),
        "QUDATA_EGRESS_CONN_RATE": (
            "egress_conn_rate",
            lambda n, r: _parse_int(n, r, 0, 1_000_000),
        ),
        "QUDATA_STORAGE_POLICY": (
            "storage_policy",
            lambda n, r: StoragePolicy(_parse_choice(n, r, tuple(StoragePolicy))),
        ),
        "QUDATA_STORAGE_CHECK_INTERVAL": (
            "storage_check_interval_s",
            lambda n, r: _parse_float(n, r, 1, 86400),
        ),
        "QUDATA_DEFAULT_STORAGE_GB": (
            "default_storage_gb",
            lambda n, r: _parse_float(n, r, 0.01, 1e6),
        ),
        "QUDATA_CRASH_RESTARTS": ("crash_restarts", lambda n, r: _parse_int(n, r, 0, 100)),
        "QUDATA_CONTAINER_LOG_MB": ("container_log_mb", lambda n, r: _parse_int(n, r, 1, 10240)),
        "QUDATA_MAX_INSTANCES": ("max_instances", lambda n, r: _parse_int(n, r, 1, 256)),
        "QUDATA_RESERVED_CPU_CORES": (
            "reserved_cpu_cores",
            lambda n, r: _parse_float(n, r, 0, 1024),
        ),
        "QUDATA_RESERVED_MEMORY_GB": (
            "reserved_memory_gb",
            lambda n, r: _parse_float(n, r, 0, 65536),
        ),
        "QUDATA_IMAGE_GC_FREE_GB": ("image_gc_free_gb", lambda n, r: _parse_float(n, r, 0, 1e6)),
        "QUDATA_IMAGE_CACHE_GB": ("image_cache_gb", lambda n, r: _parse_float(n, r, 0, 1e6)),
        "QUDATA_IMAGE_GC_INTERVAL": (
            "image_gc_interval_s",
            lambda n, r: _parse_float(n, r, 1, 86400),
        ),
        "QUDATA_PREPULL": ("prepull", _parse_images),
        "QUDATA_TLS": ("tls", lambda n, r: TlsMode(_parse_choice(n, r, tuple(TlsMode)))),
        "QUDATA_TLS_CERT_FILE": ("tls_cert_file", _parse_state_dir),  # absolute paths
        "QUDATA_TLS_KEY_FILE": ("tls_key_file", _parse_state_dir),
        "QUDATA_TLS_CLIENT_CA": ("tls_client_ca", _parse_state_dir),
        "QUDATA_HTTP_HEADER_TIMEOUT": (
            "http_header_timeout_s",
            lambda n, r: _parse_float(n, r, 0.1, 300),
        ),
        "QUDATA_HTTP_MAX_CONNECTIONS": (
            "http_max_connections",
            lambda n, r: _parse_int(n, r, 16, 65536),
        ),
        "QUDATA_SANDBOX_RUNTIME": ("sandbox_runtime", _parse_runtime),
        "QUDATA_NVIDIA_TOOLKIT_MIN": ("nvidia_toolkit_min", _parse_version),
        "QUDATA_REGISTRY_ALLOW": ("registry_allow", _parse_registries),
        "QUDATA_PREPULL_INTERVAL": (
            "prepull_interval_s",
            lambda n, r: _parse_float(n, r, 1, 30 * 86400),
        ),
        **_TUNNEL_PARSERS,
    }
    for var, (attr, parse) in parsers.items():
        raw = env.get(var)
        if raw is not None and (raw.strip() or var in _SECRET_VARS):
            kwargs[attr] = parse(var, raw)
    for var, attr in (("QUDATA_AGENT_HOST", "agent_host"), ("QUDATA_ADDRESS", "address")):
        raw = env.get(var, "").strip()
        if raw:
            kwargs[attr] = raw
    docker_host = env.get("DOCKER_HOST", "").strip()
    if docker_host:
        kwargs["docker_host"] = docker_host
    if env.get("QUDATA_METRICS_LISTEN") is not None:
        kwargs["metrics_listen"] = _parse_listen(
            "QUDATA_METRICS_LISTEN", env["QUDATA_METRICS_LISTEN"]
        )
    kwargs.update(_systemd(env))
    if kwargs.get("tunnel") == "off":
        kwargs["tunnel"] = None
    settings = Settings(**kwargs)  # type: ignore[arg-type]
    _check_agent_port(settings)
    _check_tls(settings)
    return settings
