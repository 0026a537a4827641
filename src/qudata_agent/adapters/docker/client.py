"""The connection to dockerd and the conversion of its errors: what every part shares.

Owns the SDK client (made on first use, one pool of connections for the
quick and slow calls together), clients of their own for long streams, the
set of streams in flight (pulls, event streams) that `close()` aborts, and
`_translated`, the one conversion of SDK errors into the agent's.

What stays true:
- SDK errors become the agent's by exception type and status code, chained:
  not found -> `NotFound`, a 409 -> `Conflict`, the daemon unreachable ->
  `Unavailable`, any other refusal -> `DockerError`;
- pulls and event streams each get their own connection, so closing one (from
  any thread, or all of them through `close()`) never breaks another call.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import docker
import docker.errors
import requests
import requests.exceptions

from qudata_agent.errors import AgentError, Conflict, NotFound, Unavailable

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
_UNREACHABLE = (docker.errors.DockerException, requests.exceptions.RequestException)
_POOL_SIZE = 32  # quick and slow pools together never wait for a connection
# A registry that does not answer (packets dropped) must not hold a create for long:
# past this the check counts as "registry unreachable".
_CHECK_TIMEOUT_S = 15.0


class DockerError(AgentError):
    """Docker refused or failed a request (other than not found or a conflict)."""


class Closable(Protocol):
    def close(self) -> None: ...


def explain(e: docker.errors.APIError) -> str:
    return str(e.explanation or f"status {e.status_code}")


def timed_out(e: BaseException) -> bool:
    """Whether a socket read timeout lies anywhere in the chain of `e`."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, TimeoutError | requests.exceptions.Timeout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Connection:
    """The client and the streams in flight; the engine's parts build on it."""

    def __init__(
        self,
        base_url: str | None = None,
        timeout_s: int = 30,
        check_timeout_s: float = _CHECK_TIMEOUT_S,
    ) -> None:
        self._base_url = base_url or DEFAULT_SOCKET
        self._timeout = timeout_s
        self._check_timeout_s = check_timeout_s
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()
        self._streams: set[Closable] = set()  # pulls and event streams in flight
        self._streams_lock = threading.Lock()
        self._data_root: tuple[float, str] | None = None  # (monotonic when read, path)

    def _api(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = docker.DockerClient(
                        base_url=self._base_url,
                        version="auto",
                        timeout=self._timeout,
                        max_pool_size=_POOL_SIZE,
                    )
                except _UNREACHABLE as e:
                    raise self._unreachable() from e
            return self._client

    def _own_client(self, timeout_s: float) -> docker.APIClient:
        """A client of its own for one long stream; the caller closes it."""
        version = self._api().api.api_version
        try:
            return docker.APIClient(
                base_url=self._base_url, version=version, timeout=max(1, math.ceil(timeout_s))
            )
        except _UNREACHABLE as e:
            raise self._unreachable() from e

    def _unreachable(self) -> Unavailable:
        return Unavailable(f"Docker at {self._base_url} is not reachable")

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        try:
            yield
        except docker.errors.NotFound as e:
            raise NotFound(f"{what}: {explain(e)}") from e
        except docker.errors.APIError as e:
            if e.status_code == 409:
                raise Conflict(f"{what}: {explain(e)}") from e
            raise DockerError(f"{what} failed: {explain(e)}") from e
        except requests.exceptions.RequestException as e:
            raise self._unreachable() from e
        except docker.errors.DockerException as e:
            raise DockerError(f"{what} failed ({type(e).__name__})") from e

    def _track(self, stream: Closable, on: bool) -> None:
        with self._streams_lock:
            if on:
                self._streams.add(stream)
            else:
                self._streams.discard(stream)

    def close(self) -> None:
        """Aborts pulls and event streams in flight, then closes the client."""
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream.close()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
