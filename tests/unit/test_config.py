"""Settings: defaults, each variable parsed, each bad value named, file < environment < argument."""

from __future__ import annotations

from pathlib import Path

import pytest

from qudata_agent.config import (
    DEFAULT_API_URL,
    DEFAULT_PORT_RANGE,
    DEFAULT_STATE_DIR,
    ConfigError,
    load_settings,
)
from qudata_agent.domain.tls import TlsMode

KEY = "k3y-VALUE-1234567890"


def test_defaults_with_an_empty_environment() -> None:
    settings = load_settings(environ={})
    assert settings.api_url == DEFAULT_API_URL == "https://internal.qudata.ai/v0"
    assert settings.state_dir == Path(DEFAULT_STATE_DIR) == Path("/var/lib/qudata-agent")
    assert settings.agent_host == "0.0.0.0"
    assert settings.agent_port is None
    assert settings.port_range == DEFAULT_PORT_RANGE == (40000, 49999)
    assert settings.api_key is None
    assert settings.standalone is True
    assert settings.address is None
    assert settings.docker_host is None
    assert settings.log_level == "INFO"
    assert settings.log_format == "json"
    assert settings.max_instances == 1  # one instance per host, as CONTRACT.md section 1
    assert settings.reserved_cpu_cores == 1.0
    assert settings.reserved_memory_gb == 2.0


def test_the_multi_instance_settings() -> None:
    settings = load_settings(
        environ={
            "QUDATA_MAX_INSTANCES": " 8 ",
            "QUDATA_RESERVED_CPU_CORES": "0.5",
            "QUDATA_RESERVED_MEMORY_GB": "0",
        }
    )
    assert settings.max_instances == 8
    assert settings.reserved_cpu_cores == 0.5
    assert settings.reserved_memory_gb == 0.0


def test_unrelated_variables_are_ignored() -> None:
    settings = load_settings(environ={"HOME": "/root", "AGENT_PORT": "abc", "PATH": "/bin"})
    assert settings == load_settings(environ={})


def test_every_variable_is_parsed() -> None:
    settings = load_settings(
        environ={
            "QUDATA_API_KEY": f"  {KEY} ",
            "QUDATA_API_URL": "http://cp.example:8080/v1/",
            "QUDATA_AGENT_HOST": "127.0.0.1",
            "QUDATA_AGENT_PORT": " 8123 ",
            "QUDATA_STATE_DIR": "/srv/qudata",
            "QUDATA_PORT_RANGE": "20000-20099",
            "QUDATA_ADDRESS": "203.0.113.7",
            "DOCKER_HOST": "unix:///run/docker.sock",
            "QUDATA_LOG_LEVEL": "debug",
            "QUDATA_LOG_FORMAT": "TEXT",
            "QUDATA_CP_TIMEOUT": "2.5",
            "QUDATA_CP_BACKOFF_MAX": "30",
            "QUDATA_SHUTDOWN_TIMEOUT": "7",
        }
    )
    assert settings.api_key == KEY
    assert settings.standalone is False
    assert settings.api_url == "http://cp.example:8080/v1"  # trailing slash dropped
    assert settings.agent_host == "127.0.0.1"
    assert settings.agent_port == 8123
    assert settings.state_dir == Path("/srv/qudata")
    assert settings.port_range == (20000, 20099)
    assert settings.address == "203.0.113.7"
    assert settings.docker_host == "unix:///run/docker.sock"
    assert settings.log_level == "DEBUG"
    assert settings.log_format == "text"
    assert settings.cp_timeout_s == 2.5
    assert settings.cp_backoff_max_s == 30.0
    assert settings.shutdown_timeout_s == 7.0


def test_blank_values_fall_back_to_defaults() -> None:
    settings = load_settings(
        environ={"QUDATA_AGENT_PORT": "  ", "QUDATA_API_URL": "", "QUDATA_API_KEY": "  "}
    )
    assert settings.agent_port is None
    assert settings.api_url == DEFAULT_API_URL
    assert settings.api_key is None
    assert settings.standalone is True


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("QUDATA_AGENT_PORT", "abc"),
        ("QUDATA_AGENT_PORT", "0"),
        ("QUDATA_AGENT_PORT", "70000"),
        ("QUDATA_AGENT_PORT", "80.5"),
        ("QUDATA_PORT_RANGE", "5-"),
        ("QUDATA_PORT_RANGE", "9-3"),
        ("QUDATA_PORT_RANGE", "x"),
        ("QUDATA_PORT_RANGE", "0-100"),
        ("QUDATA_PORT_RANGE", "40000-70000"),
        ("QUDATA_API_URL", "ftp://x"),
        ("QUDATA_API_URL", "nourl"),
        ("QUDATA_API_URL", "https://"),
        ("QUDATA_STATE_DIR", "relative/path"),
        ("QUDATA_LOG_LEVEL", "LOUD"),
        ("QUDATA_LOG_FORMAT", "xml"),
        ("QUDATA_CP_TIMEOUT", "-1"),
        ("QUDATA_CP_TIMEOUT", "soon"),
        ("QUDATA_CP_BACKOFF_MAX", "0"),
        ("QUDATA_SHUTDOWN_TIMEOUT", "3600"),
        ("QUDATA_MAX_INSTANCES", "0"),
        ("QUDATA_MAX_INSTANCES", "2.5"),
        ("QUDATA_MAX_INSTANCES", "1000"),
        ("QUDATA_RESERVED_CPU_CORES", "-1"),
        ("QUDATA_RESERVED_CPU_CORES", "nan"),
        ("QUDATA_RESERVED_MEMORY_GB", "lots"),
        ("QUDATA_RESERVED_MEMORY_GB", "inf"),
        ("QUDATA_CRASH_RESTARTS", "-1"),
        ("QUDATA_CRASH_RESTARTS", "many"),
        ("QUDATA_CRASH_RESTARTS", "1000"),
        ("QUDATA_CONTAINER_LOG_MB", "0"),
        ("QUDATA_CONTAINER_LOG_MB", "1.5"),
    ],
)
def test_a_bad_value_names_its_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={var: value})
    assert str(caught.value).startswith(f"{var}:")


@pytest.mark.parametrize("key", ["abc def", "abc\tdef", "abc\x00def", "abc\x1bdef"])
def test_an_api_key_with_whitespace_or_control_characters_is_refused_unechoed(key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"QUDATA_API_KEY": key})
    message = str(caught.value)
    assert message.startswith("QUDATA_API_KEY:")
    assert "abc" not in message
    assert "def" not in message


def test_an_api_key_refused_from_the_argument_is_not_echoed_either() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={}, api_key="secret-part other-part")
    assert "secret-part" not in str(caught.value)
    assert "other-part" not in str(caught.value)


@pytest.mark.parametrize("port", ["40000", "45000", "49999"])
def test_the_agent_port_inside_the_port_range_is_refused(port: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"QUDATA_AGENT_PORT": port})
    assert str(caught.value).startswith("QUDATA_AGENT_PORT:")
    assert "QUDATA_PORT_RANGE" in str(caught.value)


def test_the_agent_port_just_outside_the_port_range_is_accepted() -> None:
    env = {"QUDATA_PORT_RANGE": "40000-49999"}
    assert load_settings(environ={**env, "QUDATA_AGENT_PORT": "39999"}).agent_port == 39999
    assert load_settings(environ={**env, "QUDATA_AGENT_PORT": "50000"}).agent_port == 50000


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_comments_export_and_quotes(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "agent.env",
        "# the agent's settings\n"
        "\n"
        "   # an indented comment\n"
        f"export QUDATA_API_KEY={KEY}\n"
        'QUDATA_API_URL="https://cp.example/v2"\n'
        "QUDATA_STATE_DIR='/srv/state dir'\n"
        "  QUDATA_AGENT_PORT = 8200  \n"
        "QUDATA_ADDRESS=198.51.100.4\n",
    )
    settings = load_settings(environ={}, config_file=config)
    assert settings.api_key == KEY
    assert settings.api_url == "https://cp.example/v2"
    assert settings.state_dir == Path("/srv/state dir")
    assert settings.agent_port == 8200
    assert settings.address == "198.51.100.4"


def test_config_file_named_by_the_environment_is_read(tmp_path: Path) -> None:
    config = _write(tmp_path / "agent.env", "QUDATA_AGENT_PORT=8300\n")
    settings = load_settings(environ={"QUDATA_CONFIG_FILE": str(config)})
    assert settings.agent_port == 8300


def test_environment_wins_over_the_file_and_argument_wins_over_both(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "agent.env",
        "QUDATA_API_KEY=from-file\nQUDATA_AGENT_PORT=8001\nQUDATA_ADDRESS=192.0.2.1\n",
    )
    env = {"QUDATA_API_KEY": "from-env", "QUDATA_AGENT_PORT": "8002"}
    settings = load_settings(environ=env, config_file=config)
    assert settings.api_key == "from-env"
    assert settings.agent_port == 8002
    assert settings.address == "192.0.2.1"  # only the file sets it
    settings = load_settings(environ=env, config_file=config, api_key="from-argument")
    assert settings.api_key == "from-argument"


def test_a_malformed_file_line_names_the_file_and_line(tmp_path: Path) -> None:
    config = _write(tmp_path / "agent.env", "# ok\nQUDATA_AGENT_PORT=8001\nthis is not a setting\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={}, config_file=config)
    assert str(config) in str(caught.value)
    assert "line 3" in str(caught.value)


def test_a_file_line_with_an_empty_key_is_malformed(tmp_path: Path) -> None:
    config = _write(tmp_path / "agent.env", "=value\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_settings(environ={}, config_file=config)


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.env"
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={}, config_file=missing)
    assert str(missing) in str(caught.value)


def test_a_bad_value_in_the_file_names_its_variable(tmp_path: Path) -> None:
    config = _write(tmp_path / "agent.env", "QUDATA_LOG_LEVEL=LOUD\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={}, config_file=config)
    assert str(caught.value).startswith("QUDATA_LOG_LEVEL:")


def test_settings_repr_hides_the_api_key() -> None:
    settings = load_settings(environ={"QUDATA_API_KEY": KEY})
    assert settings.api_key == KEY
    assert KEY not in repr(settings)
    assert KEY not in str(settings)


def test_settings_are_frozen() -> None:
    settings = load_settings(environ={})
    with pytest.raises(AttributeError):
        settings.agent_port = 1  # type: ignore[misc]


def test_the_restart_and_log_settings() -> None:
    settings = load_settings(environ={"QUDATA_CRASH_RESTARTS": "0", "QUDATA_CONTAINER_LOG_MB": "7"})
    assert (settings.crash_restarts, settings.container_log_mb) == (0, 7)
    assert (
        load_settings(environ={}).crash_restarts,
        load_settings(environ={}).container_log_mb,
    ) == (
        5,
        100,
    )


def test_the_port_settings_default_to_the_contract() -> None:
    settings = load_settings(environ={})
    assert settings.tls is TlsMode.ON
    assert settings.tls_cert_file is settings.tls_key_file is settings.tls_client_ca is None
    assert settings.http_header_timeout_s == 10.0
    assert settings.http_max_connections == 256


def test_the_port_settings_are_parsed() -> None:
    settings = load_settings(
        environ={
            "QUDATA_TLS": "Required",
            "QUDATA_TLS_CERT_FILE": "/etc/qudata-agent/cert.pem",
            "QUDATA_TLS_KEY_FILE": "/etc/qudata-agent/key.pem",
            "QUDATA_TLS_CLIENT_CA": "/etc/qudata-agent/cp-ca.pem",
            "QUDATA_HTTP_HEADER_TIMEOUT": "2.5",
            "QUDATA_HTTP_MAX_CONNECTIONS": "1024",
        }
    )
    assert settings.tls is TlsMode.REQUIRED
    assert settings.tls_cert_file == Path("/etc/qudata-agent/cert.pem")
    assert settings.tls_key_file == Path("/etc/qudata-agent/key.pem")
    assert settings.tls_client_ca == Path("/etc/qudata-agent/cp-ca.pem")
    assert settings.http_header_timeout_s == 2.5
    assert settings.http_max_connections == 1024


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"QUDATA_TLS": "sometimes"}, "QUDATA_TLS"),
        ({"QUDATA_TLS_CERT_FILE": "cert.pem"}, "QUDATA_TLS_CERT_FILE"),  # not absolute
        ({"QUDATA_TLS_CERT_FILE": "/c.pem"}, "QUDATA_TLS_KEY_FILE"),  # one without the other
        ({"QUDATA_TLS_KEY_FILE": "/k.pem"}, "QUDATA_TLS_CERT_FILE"),
        ({"QUDATA_TLS": "off", "QUDATA_TLS_CLIENT_CA": "/ca.pem"}, "QUDATA_TLS_CLIENT_CA"),
        ({"QUDATA_HTTP_HEADER_TIMEOUT": "0"}, "QUDATA_HTTP_HEADER_TIMEOUT"),
        ({"QUDATA_HTTP_MAX_CONNECTIONS": "8"}, "QUDATA_HTTP_MAX_CONNECTIONS"),
    ],
)
def test_a_bad_port_setting_names_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(environ=env)
