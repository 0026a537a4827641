"""Secret files (0600 from creation, atomic replace), the state dir, Credentials, log redaction."""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from qudata_agent import logs
from qudata_agent.adapters.secrets import DIR_MODE, FILE_MODE, SecretFile, ensure_private_dir
from qudata_agent.services.credentials import Credentials
from qudata_agent.state_dir import AGENT_SECRET_FILE, API_KEY_FILE


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """A umask that would leave new files world-readable, so 0600 must come from the code."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# SecretFile


def test_a_missing_secret_file_reads_as_none(tmp_path: Path) -> None:
    assert SecretFile(tmp_path / "absent").read() is None


def test_an_empty_secret_file_reads_as_none(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_text("  \n")
    path.chmod(0o600)
    assert SecretFile(path).read() is None


def test_write_creates_the_file_with_mode_0600(tmp_path: Path, loose_umask: None) -> None:
    path = tmp_path / "agent_secret"
    SecretFile(path).write("value-1")
    assert _mode(path) == FILE_MODE == 0o600
    assert path.read_text() == "value-1\n"
    assert SecretFile(path).read() == "value-1"


def test_write_never_opens_the_file_with_a_looser_mode(
    tmp_path: Path, loose_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file the write creates is asked for 0600 at open(2), not chmod-ed later."""
    created: list[int] = []
    real_open = os.open

    def recording_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if flags & os.O_CREAT:
            created.append(mode)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", recording_open)
    SecretFile(tmp_path / "agent_secret").write("value-1")
    assert created == [0o600]


def test_write_replaces_atomically_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "agent_secret"
    secret_file = SecretFile(path)
    secret_file.write("old-value")
    inode_before = path.stat().st_ino
    secret_file.write("new-value")
    assert secret_file.read() == "new-value"
    assert path.stat().st_ino != inode_before  # a new file renamed over the old one
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent_secret"]


def test_write_recovers_from_a_stale_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "agent_secret"
    stale = tmp_path / ".agent_secret.tmp"
    stale.write_text("half-written")
    SecretFile(path).write("value")
    assert SecretFile(path).read() == "value"
    assert not stale.exists()


def test_read_tightens_a_world_readable_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    path = tmp_path / "api_key"
    path.write_text("the-key\n")
    path.chmod(0o644)
    assert SecretFile(path).read() == "the-key"
    assert _mode(path) == 0o600
    assert [r.getMessage() for r in caplog.records] == ["secret file permissions tightened"]
    assert "the-key" not in caplog.text


def test_read_leaves_a_private_file_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    path = tmp_path / "api_key"
    path.write_text("the-key\n")
    path.chmod(0o400)
    assert SecretFile(path).read() == "the-key"
    assert _mode(path) == 0o400
    assert caplog.records == []


# the state directory


def test_ensure_private_dir_creates_0700_with_parents(tmp_path: Path, loose_umask: None) -> None:
    state = tmp_path / "var" / "lib" / "qudata-agent"
    ensure_private_dir(state)
    assert state.is_dir()
    assert _mode(state) == DIR_MODE == 0o700


def test_ensure_private_dir_tightens_0755(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    ensure_private_dir(state)
    assert _mode(state) == 0o700
    assert [r.getMessage() for r in caplog.records] == ["state directory permissions tightened"]


def test_ensure_private_dir_is_quiet_when_already_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    state.chmod(0o700)
    ensure_private_dir(state)
    assert _mode(state) == 0o700
    assert caplog.records == []


# Credentials


def _credentials(state: Path) -> Credentials:
    return Credentials(SecretFile(state / AGENT_SECRET_FILE), SecretFile(state / API_KEY_FILE))


def test_a_fresh_state_dir_has_no_secret_and_no_key(tmp_path: Path) -> None:
    creds = _credentials(tmp_path)
    assert creds.agent_secret() is None
    assert creds.api_key(None) is None
    assert creds.secret_path == tmp_path / AGENT_SECRET_FILE
    assert creds.api_key_path == tmp_path / API_KEY_FILE


def test_ensure_secret_generates_once_and_keeps_it_across_restarts(tmp_path: Path) -> None:
    creds = _credentials(tmp_path)
    secret = creds.ensure_secret()
    assert len(secret) >= 32
    assert creds.ensure_secret() == secret
    assert creds.agent_secret() == secret
    assert (tmp_path / AGENT_SECRET_FILE).read_text().strip() == secret
    assert _mode(tmp_path / AGENT_SECRET_FILE) == 0o600

    restarted = _credentials(tmp_path)
    assert restarted.agent_secret() == secret
    assert restarted.ensure_secret() == secret


def test_two_state_dirs_get_different_secrets(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _credentials(tmp_path / "a"), _credentials(tmp_path / "b")
    assert a.ensure_secret() != b.ensure_secret()


def test_replace_secret_writes_the_file_first(tmp_path: Path) -> None:
    creds = _credentials(tmp_path)
    first = creds.ensure_secret()
    new = secrets.token_urlsafe(24)
    assert creds.replace_secret(new) is True
    assert creds.agent_secret() == new
    assert (tmp_path / AGENT_SECRET_FILE).read_text().strip() == new
    assert _credentials(tmp_path).agent_secret() == new
    assert new != first


def test_replace_secret_with_the_same_value_changes_nothing(tmp_path: Path) -> None:
    creds = _credentials(tmp_path)
    secret = creds.ensure_secret()
    inode = (tmp_path / AGENT_SECRET_FILE).stat().st_ino
    assert creds.replace_secret(secret) is False
    assert (tmp_path / AGENT_SECRET_FILE).stat().st_ino == inode


def test_a_configured_api_key_is_kept_and_returned_later(tmp_path: Path) -> None:
    key = "configured-" + secrets.token_hex(8)
    creds = _credentials(tmp_path)
    assert creds.api_key(key) == key
    assert (tmp_path / API_KEY_FILE).read_text().strip() == key
    assert _mode(tmp_path / API_KEY_FILE) == 0o600
    assert creds.api_key(None) == key
    assert _credentials(tmp_path).api_key(None) == key


def test_a_newly_configured_api_key_replaces_the_kept_one(tmp_path: Path) -> None:
    creds = _credentials(tmp_path)
    creds.api_key("first-key-123")
    assert creds.api_key("second-key-456") == "second-key-456"
    assert _credentials(tmp_path).api_key(None) == "second-key-456"


def test_the_same_configured_key_does_not_rewrite_the_file(tmp_path: Path) -> None:
    creds = _credentials(tmp_path)
    creds.api_key("same-key-123")
    inode = (tmp_path / API_KEY_FILE).stat().st_ino
    creds.api_key("same-key-123")
    assert (tmp_path / API_KEY_FILE).stat().st_ino == inode


# log redaction


@pytest.fixture
def json_logging() -> Iterator[None]:
    """Puts back the root logger that the test's `logs.setup` call rewires.

    `logs.setup` runs in the test body, not here: capsys swaps `sys.stderr` per
    test phase, and the handler must hold the stream of the call phase.
    """
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    names = ("httpx", "httpcore", "docker", "urllib3")
    saved_levels = {name: logging.getLogger(name).level for name in names}
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def _lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_a_known_secret_never_shows_in_a_log_line(
    tmp_path: Path, json_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.setup("DEBUG", "json")
    creds = _credentials(tmp_path)
    secret = creds.ensure_secret()
    log = logging.getLogger("qudata_agent.test_redaction")

    log.info("the secret is %s", secret)
    log.warning(f"inline {secret} too", extra={"field": f"x{secret}x"})
    try:
        raise RuntimeError(f"failure carrying {secret}")
    except RuntimeError:
        log.exception("request failed")

    err = capsys.readouterr().err
    assert secret not in err
    lines = _lines(err)
    assert [line["msg"] for line in lines if line["logger"] == log.name] == [
        "the secret is ***",
        "inline *** too",
        "request failed",
    ]
    ours = [line for line in lines if line["logger"] == log.name]
    assert ours[1]["field"] == "x***x"
    assert "RuntimeError: failure carrying ***" in str(ours[2]["exc"])


def test_a_secret_read_from_its_file_at_start_is_redacted(
    tmp_path: Path, json_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.setup("DEBUG", "json")
    secret = secrets.token_urlsafe(32)
    SecretFile(tmp_path / AGENT_SECRET_FILE).write(secret)
    _credentials(tmp_path)  # a restart: the secret is only read, not replaced
    logging.getLogger("qudata_agent.test_redaction").error("got %r", secret)
    err = capsys.readouterr().err
    assert secret not in err
    assert "***" in err


def test_a_replaced_secret_and_the_api_key_are_redacted(
    tmp_path: Path, json_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.setup("DEBUG", "json")
    creds = _credentials(tmp_path)
    new_secret = secrets.token_urlsafe(32)
    key = "apikey-" + secrets.token_hex(16)
    creds.replace_secret(new_secret)
    creds.api_key(key)
    log = logging.getLogger("qudata_agent.test_redaction")
    log.error("secret=%s key=%s", new_secret, key)
    err = capsys.readouterr().err
    assert new_secret not in err
    assert key not in err
    assert "secret=*** key=***" in err


def test_a_stored_api_key_read_back_is_redacted(
    tmp_path: Path, json_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.setup("DEBUG", "json")
    key = "stored-" + secrets.token_hex(16)
    SecretFile(tmp_path / API_KEY_FILE).write(key)
    assert _credentials(tmp_path).api_key(None) == key
    logging.getLogger("qudata_agent.test_redaction").warning("key %s", key)
    err = capsys.readouterr().err
    assert key not in err
    assert "key ***" in err
