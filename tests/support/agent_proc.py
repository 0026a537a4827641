"""Runs the real `qudata-agent run` process for end-to-end tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_command() -> list[str]:
    exe = shutil.which("qudata-agent", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "qudata_agent"]


class AgentProcess:
    def __init__(self, state_dir: Path, env: dict[str, str] | None = None, port: int | None = None):
        self.state_dir = state_dir
        self.port = port or free_port()
        self.log_path = state_dir.parent / f"{state_dir.name}-agent-{time.monotonic_ns()}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("QUDATA_")}
        base.update(
            {
                "QUDATA_STATE_DIR": str(state_dir),
                "QUDATA_AGENT_HOST": "127.0.0.1",
                "QUDATA_AGENT_PORT": str(self.port),
                "QUDATA_LOG_LEVEL": "DEBUG",
                "QUDATA_CP_BACKOFF_MAX": "0.5",
                "QUDATA_CP_TIMEOUT": "2",
                "QUDATA_PORT_RANGE": "20000-20999",
                # Tests never reach the internet: no "what is my IP" lookups unless a
                # test points them at its own loopback server.
                "QUDATA_ADDRESS_LOOKUP_URLS": "none",
                # Docker here is shared: no agent under test removes images unless a
                # test turns its image GC on (with images of its own).
                "QUDATA_IMAGE_GC_FREE_GB": "0",
            }
        )
        base.update(env or {})
        self.env = base
        self.proc: subprocess.Popen[bytes] | None = None
        # Where plain HTTP is refused (QUDATA_TLS=required, mutual TLS), readiness is asked
        # over https, with this client certificate (cert file, key file) for mutual TLS.
        self.client_cert: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def plain_refused(self) -> bool:
        return self.env.get("QUDATA_TLS") == "required" or bool(
            self.env.get("QUDATA_TLS_CLIENT_CA")
        )

    def tls_client(self) -> ssl.SSLContext:
        """A client context that takes any certificate (tests check the pin themselves)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert is not None:
            ctx.load_cert_chain(*self.client_cert)
        return ctx

    def start(self, *args: str, wait: bool = True) -> AgentProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*agent_command(), "run", *args],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.log()}")
            try:
                if self.plain_refused:
                    answer = httpx.get(
                        self.https_url + "/ping", timeout=0.5, verify=self.tls_client()
                    )
                else:
                    answer = httpx.get(self.url + "/ping", timeout=0.5)
                if answer.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent did not answer /ping in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> tuple[int, float]:
        """Sends `sig`; returns (exit code, seconds until exit)."""
        assert self.proc is not None
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            raise AssertionError(f"agent did not exit within {timeout}s of signal {sig}") from None
        finally:
            self._log.close()
        return code, time.monotonic() - started

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def secret(self) -> str:
        return (self.state_dir / "agent_secret").read_text().strip()
