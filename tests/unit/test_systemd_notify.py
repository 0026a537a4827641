"""sd_notify over a real datagram socket, the watchdog loop, and journald priorities."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import sys
from pathlib import Path

import pytest

from qudata_agent import logs
from qudata_agent.adapters.systemd import Notifier
from qudata_agent.config import load_settings
from qudata_agent.loops.watchdog import ping_interval_s, watchdog_loop


def _listener(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    return sock


def test_ready_stopping_and_watchdog_reach_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with _listener(path) as sock:
        notifier = Notifier(path)
        assert notifier.enabled
        assert notifier.ready("listening on port 1024")
        assert sock.recv(4096) == b"READY=1\nSTATUS=listening on port 1024"
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_an_abstract_socket_name_starts_with_nul() -> None:
    name = f"qudata-test-{os.getpid()}"
    with _listener("\0" + name) as sock:
        assert Notifier("@" + name).ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_a_socket_or_a_listener_nothing_fails(tmp_path: Path) -> None:
    assert not Notifier(None).enabled
    assert Notifier(None).ready() is False
    assert Notifier(str(tmp_path / "nobody-listens")).watchdog() is False


async def test_the_watchdog_pings_from_the_event_loop_at_half_the_timeout() -> None:
    assert ping_interval_s(60_000_000) == 30
    pings: list[float] = []
    task = asyncio.create_task(watchdog_loop(lambda: pings.append(1), 0.01))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(pings) >= 3


def test_systemd_variables_come_from_the_environment_only(tmp_path: Path) -> None:
    conf = tmp_path / "agent.env"
    conf.write_text("NOTIFY_SOCKET=/from/the/file\nWATCHDOG_USEC=1\n")
    settings = load_settings({}, config_file=conf)
    assert settings.notify_socket is None and settings.watchdog_usec is None
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "60000000"}
    settings = load_settings(env)
    assert settings.notify_socket == "/run/systemd/notify"
    assert settings.watchdog_usec == 60_000_000
    # The watchdog is another process's (WATCHDOG_PID): not ours to ping.
    assert load_settings({**env, "WATCHDOG_PID": "1"}).watchdog_usec is None
    assert load_settings({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_usec == 60_000_000


def test_metrics_listen_setting() -> None:
    assert load_settings({}).metrics_listen is None
    assert load_settings({"QUDATA_METRICS_LISTEN": "127.0.0.1:9101"}).metrics_listen == (
        "127.0.0.1",
        9101,
    )
    assert load_settings({"QUDATA_METRICS_LISTEN": "off"}).metrics_listen is None
    with pytest.raises(ValueError, match="QUDATA_METRICS_LISTEN"):
        load_settings({"QUDATA_METRICS_LISTEN": "9101"})


def test_journald_lines_carry_their_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logs.setup("DEBUG", "json", journal=True)
    log = logging.getLogger("qudata_agent.test")
    log.info("hello")
    log.warning("careful")
    log.error("broken")
    log.debug("detail")
    lines = stream.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>", "<7>"]
    assert '"msg": "careful"' in lines[1]
    stream.truncate(0)
    stream.seek(0)
    logs.setup("INFO", "json", journal=False)
    log.warning("plain")
    assert stream.getvalue().startswith("{")
    logs.setup("INFO", "json")


def test_stderr_is_the_journal_only_when_its_device_and_inode_match(tmp_path: Path) -> None:
    assert not logs.stderr_is_journal(None)
    st = os.fstat(sys.stderr.fileno())
    assert logs.stderr_is_journal(f"{st.st_dev}:{st.st_ino}")
    assert not logs.stderr_is_journal(f"{st.st_dev}:{st.st_ino + 1}")


def test_the_metrics_listener_is_loopback_only() -> None:
    assert load_settings({"QUDATA_METRICS_LISTEN": "[::1]:9101"}).metrics_listen == ("::1", 9101)
    for address in ("0.0.0.0:9101", "10.0.0.5:9101", "localhost:9101"):
        with pytest.raises(ValueError, match="loopback"):
            load_settings({"QUDATA_METRICS_LISTEN": address})
