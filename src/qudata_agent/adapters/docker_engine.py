"""The Docker engine, through the official SDK: the only module that imports `docker`.

Owns the client and the translation of SDK errors into the agent's own
(`Unavailable` when the daemon cannot be reached), by exception type, chained.
Calls here block: async code reaches them through `blocking.Blocking`.
What stays true: no other module sees a docker type.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import docker
import docker.errors
import requests.exceptions

from qudata_agent.errors import Unavailable

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
_UNREACHABLE = (docker.errors.DockerException, requests.exceptions.RequestException)


class DockerEngine:
    def __init__(self, base_url: str | None = None, timeout_s: int = 30) -> None:
        self._base_url = base_url or DEFAULT_SOCKET
        self._timeout = timeout_s
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()

    def _api(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = docker.DockerClient(
                        base_url=self._base_url, version="auto", timeout=self._timeout
                    )
                except _UNREACHABLE as e:
                    raise Unavailable(f"Docker at {self._base_url} is not reachable") from e
            return self._client

    def info(self) -> dict[str, Any]:
        try:
            info: dict[str, Any] = self._api().info()
        except _UNREACHABLE as e:
            raise Unavailable(f"Docker at {self._base_url} is not reachable") from e
        return info

    def data_root(self) -> str:
        """Docker's data root (where images and writable layers live)."""
        return str(self.info().get("DockerRootDir") or "/var/lib/docker")

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
