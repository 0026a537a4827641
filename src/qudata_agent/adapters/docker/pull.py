"""Image pulls: progress, an inactivity deadline, and an abort from any thread.

The SDK's own `pull()` sets no read timeout, so the request is made here on a
client of its own, every read bounded by the inactivity deadline; Docker's
progress lines are summed by `progress.PullTally`.

What stays true: a password is never part of a message; `close()` aborts a
pull in flight (one still waiting for Docker's first answer ends at once
when that answer comes); a pull that ends without the image is an error.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import docker
import docker.auth
import docker.errors
import docker.types
import requests
import requests.exceptions

from qudata_agent.adapters.docker.client import DockerError, explain, timed_out
from qudata_agent.adapters.docker.images import Images
from qudata_agent.adapters.docker.progress import (
    PullTally,
    auth_config,
    redact,
    stream_error,
)
from qudata_agent.domain.image_ref import ImageRef, parse_reference
from qudata_agent.domain.pull_progress import PullProgress
from qudata_agent.domain.registry_credentials import RegistryCredentials
from qudata_agent.errors import NotFound


class Pulls(Images):
    def pull(
        self,
        ref: str,
        auth: RegistryCredentials | None,
        on_progress: Callable[[PullProgress], None],
        inactivity_s: float,
    ) -> None:
        """Pulls `ref`, reporting progress; gives up after `inactivity_s` of silence.

        Every read from Docker is bounded by `inactivity_s` (the SDK's own
        `pull()` sets no read timeout at all, so the request is made here on a
        client of its own). `close()` aborts a pull in flight (one still waiting
        for Docker's first answer ends at once when that answer comes).
        """
        parsed = parse_reference(ref)
        api = self._own_client(inactivity_s)
        handle = _PullHandle()
        self._track(handle, True)
        try:
            with self._pull_errors(ref, auth, inactivity_s, handle):
                response = _open_pull(api, parsed, auth, inactivity_s)
                handle.attach(response)
                _follow_pull(ref, response, auth, on_progress)
        finally:
            self._track(handle, False)
            api.close()
        if handle.aborted:
            raise DockerError(f"pull of {ref} was aborted")
        if not self.image_present(ref):
            raise DockerError(f"pull of {ref} ended without the image")

    @contextmanager
    def _pull_errors(
        self,
        ref: str,
        auth: RegistryCredentials | None,
        inactivity_s: float,
        handle: _PullHandle,
    ) -> Iterator[None]:
        try:
            yield
        except docker.errors.APIError as e:
            kind = NotFound if isinstance(e, docker.errors.NotFound) else DockerError
            raise kind(f"pull of {ref} failed: {redact(explain(e), auth)}") from e
        except (requests.exceptions.RequestException, OSError) as e:
            if handle.aborted:
                raise DockerError(f"pull of {ref} was aborted") from e
            if timed_out(e):
                raise DockerError(f"pull of {ref} made no progress for {inactivity_s:g} s") from e
            raise self._unreachable() from e
        except ValueError as e:  # a progress line that is not JSON
            raise DockerError(f"pull of {ref} failed: unreadable progress from Docker") from e


class _PullHandle:
    """Lets another thread abort a pull: closing shuts its response's socket down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancel: docker.types.CancellableStream[bytes] | None = None
        self.aborted = False

    def attach(self, response: requests.Response) -> None:
        with self._lock:
            self._cancel = docker.types.CancellableStream(iter(()), response)
            aborted = self.aborted
        if aborted:  # close() came while the request was on its way
            self._shut()

    def close(self) -> None:
        with self._lock:
            self.aborted = True
        self._shut()

    def _shut(self) -> None:
        with self._lock:
            cancel = self._cancel
        if cancel is not None:
            with contextlib.suppress(OSError, AttributeError):  # it finished meanwhile
                cancel.close()


def _open_pull(
    api: docker.APIClient,
    ref: ImageRef,
    auth: RegistryCredentials | None,
    inactivity_s: float,
) -> requests.Response:
    headers: dict[str, str | bytes] = {}
    if auth is not None:
        headers["X-Registry-Auth"] = docker.auth.encode_header(auth_config(auth, ref))
    response = api.post(
        f"{api.base_url}/v{api.api_version}/images/create",
        params={"fromImage": ref.repository, "tag": ref.pin},
        headers=headers,
        stream=True,
        timeout=inactivity_s,
    )
    try:
        response.raise_for_status()
    except requests.exceptions.HTTPError as e:
        docker.errors.create_api_error_from_http_exception(e)  # raises an APIError
    return response


def _follow_pull(
    ref: str,
    response: requests.Response,
    auth: RegistryCredentials | None,
    on_progress: Callable[[PullProgress], None],
) -> None:
    tally = PullTally()
    with response:
        for line in response.iter_lines():
            if not line.strip():
                continue
            message = json.loads(line)
            error = stream_error(message)
            if error is not None:
                raise DockerError(f"pull of {ref} failed: {redact(error, auth)}")
            progress = tally.feed(message)
            if progress is not None:
                on_progress(progress)
