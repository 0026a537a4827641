"""Settings: the one place that reads the process environment.

Everything the agent can be told (each setting is declared once, in
settings.py) comes in here once, at start, from three sources in rising
priority: an optional env-style config file, the environment, and the command
line. The result is a frozen `Settings` that is passed down explicitly; nothing
else in the package reads `os.environ`.

What stays true:
- a bad value fails the start with a `ConfigError` that names the variable and
  says what was expected; a secret's value is never part of that message;
- a blank value is the same as none: the setting keeps its default;
- defaults follow CONTRACT.md section 3.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from qudata_agent.config_values import ConfigError as ConfigError
from qudata_agent.domain.tls import TlsMode
from qudata_agent.settings import DEFAULT_ADDRESS_LOOKUP_URLS as DEFAULT_ADDRESS_LOOKUP_URLS
from qudata_agent.settings import DEFAULT_API_URL as DEFAULT_API_URL
from qudata_agent.settings import DEFAULT_PORT_RANGE as DEFAULT_PORT_RANGE
from qudata_agent.settings import DEFAULT_STATE_DIR as DEFAULT_STATE_DIR
from qudata_agent.settings import Settings as Settings
from qudata_agent.settings import declared

PREFIX = "QUDATA_"
# What systemd tells a service it starts (never read from the config file).
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")


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
    for name, var, _default in declared():
        raw = env.get(var.env)
        if raw is not None and raw.strip():
            kwargs[name] = var.parse(var.env, raw)
    kwargs.update(_systemd(env))
    settings = Settings(**kwargs)  # type: ignore[arg-type]
    _check_agent_port(settings)
    _check_tls(settings)
    return settings
