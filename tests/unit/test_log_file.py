"""The optional log file: QUDATA_LOG_FILE, rotated by size, secrets redacted like on stderr."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from qudata_agent import logs
from qudata_agent.config import ConfigError, load_settings


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        yield
    finally:
        logs.setup("DEBUG", "json")  # closes the test's log file
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)


def test_settings_read_the_log_file_and_its_cap() -> None:
    env = {"QUDATA_LOG_FILE": "/var/log/qudata-agent/agent.log", "QUDATA_LOG_FILE_MAX_MB": "5"}
    settings = load_settings(environ=env)
    assert settings.log_file == Path("/var/log/qudata-agent/agent.log")
    assert settings.log_file_max_mb == 5
    defaults = load_settings(environ={})
    assert defaults.log_file is None and defaults.log_file_max_mb == 50


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"QUDATA_LOG_FILE": "agent.log"}, "QUDATA_LOG_FILE"),
        ({"QUDATA_LOG_FILE_MAX_MB": "0"}, "QUDATA_LOG_FILE_MAX_MB"),
        ({"QUDATA_LOG_FILE_MAX_MB": "lots"}, "QUDATA_LOG_FILE_MAX_MB"),
    ],
)
def test_bad_log_file_settings_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(environ=env)


def test_lines_go_to_the_file_too_with_secrets_redacted(
    tmp_path: Path, restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.log"
    logs.setup("INFO", "json", file=path)
    logs.redact("file-secret-4242")
    logging.getLogger("qudata_agent.test").info("key is file-secret-4242", extra={"n": 1})
    (line,) = path.read_text().splitlines()
    record = json.loads(line)
    assert record["msg"] == "key is ***" and record["n"] == 1
    assert "file-secret-4242" not in capsys.readouterr().err


def test_the_file_is_rotated_at_its_cap_and_only_three_old_ones_are_kept(
    tmp_path: Path, restore_logging: None
) -> None:
    path = tmp_path / "agent.log"
    logs.setup("INFO", "text", file=path, file_max_bytes=2000)
    log = logging.getLogger("qudata_agent.test")
    for n in range(200):
        log.info("line %d %s", n, "x" * 80)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["agent.log", "agent.log.1", "agent.log.2", "agent.log.3"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    assert "line 199" in path.read_text()
