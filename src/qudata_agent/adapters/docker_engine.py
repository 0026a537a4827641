"""The Docker engine, through the official SDK: the only module that imports `docker`.

Owns the client, image pulls (with progress and an inactivity deadline), the
translation of a `ContainerSpec` into SDK arguments (`_create_kwargs`, the one
place a spec meets Docker), the container lifecycle, the reading of Docker's
answers back into `ContainerState` (`_state_from_attrs`), logs and the event
stream. Calls here block: async code reaches them through `blocking.Blocking`.

What stays true:
- no other module sees a docker or requests type;
- SDK errors become the agent's by exception type and status code, chained:
  not found -> `NotFound`, a 409 -> `Conflict`, the daemon unreachable ->
  `Unavailable`, any other refusal -> `DockerError`;
- a registry password is never part of a message or a log line;
- pulls and event streams each get their own connection, so closing one (from
  any thread, or all of them through `close()`) never breaks another call.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Protocol

import docker
import docker.auth
import docker.errors
import docker.types
import requests
import requests.exceptions

from qudata_agent.adapters.docker_pull import (
    PullProgress,
    PullTally,
    auth_config,
    redact,
    stream_error,
)
from qudata_agent.domain.container_spec import (
    LABEL_AGENT,
    LABEL_INSTANCE,
    LOG_FILES,
    ContainerSpec,
    ContainerState,
)
from qudata_agent.domain.image_access import LocalImage, RegistryRefused, RegistryUnreachable
from qudata_agent.domain.image_ref import ImageRef, parse_reference
from qudata_agent.domain.isolation import RuntimeInfo, cdi_device, parse_runtimes
from qudata_agent.domain.log_tail import LogTail, TailBuffer
from qudata_agent.domain.network import NetworkInfo, network_options
from qudata_agent.domain.registry_credentials import RegistryCredentials
from qudata_agent.domain.ssh_init import ImageConfig
from qudata_agent.domain.storage import StorageInfo
from qudata_agent.errors import AgentError, Conflict, NotFound, Unavailable

__all__ = ["DockerEngine", "DockerError", "EventStream", "PullProgress"]

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
_UNREACHABLE = (docker.errors.DockerException, requests.exceptions.RequestException)
_NEVER = "0001-01-01T00:00:00Z"  # Docker's zero time: "did not happen"
_ANONYMOUS = re.compile(r"[0-9a-f]{64}")  # the name Docker gives an anonymous volume
_POOL_SIZE = 32  # quick and slow pools together never wait for a connection
# A registry that does not answer (packets dropped) must not hold a create for long:
# past this the check counts as "registry unreachable".
_CHECK_TIMEOUT_S = 15.0
# Docker walks a writable layer to size it; a tenant's million files must not hold a
# thread for longer than this.
_SIZE_TIMEOUT_S = 60.0


LABEL_PROBE = "qudata.probe"  # a runtime's start check (services.isolation), no instance
_STALE_PROBE_S = 300


class DockerError(AgentError):
    """Docker refused or failed a request (other than not found or a conflict)."""


class _Closable(Protocol):
    def close(self) -> None: ...


def _explain(e: docker.errors.APIError) -> str:
    return str(e.explanation or f"status {e.status_code}")


def _timed_out(e: BaseException) -> bool:
    """Whether a socket read timeout lies anywhere in the chain of `e`."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, TimeoutError | requests.exceptions.Timeout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_DATA_ROOT_TTL_S = 60.0


class DockerEngine:
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
        self._streams: set[_Closable] = set()  # pulls and event streams in flight
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
            raise NotFound(f"{what}: {_explain(e)}") from e
        except docker.errors.APIError as e:
            if e.status_code == 409:
                raise Conflict(f"{what}: {_explain(e)}") from e
            raise DockerError(f"{what} failed: {_explain(e)}") from e
        except requests.exceptions.RequestException as e:
            raise self._unreachable() from e
        except docker.errors.DockerException as e:
            raise DockerError(f"{what} failed ({type(e).__name__})") from e

    def _track(self, stream: _Closable, on: bool) -> None:
        with self._streams_lock:
            if on:
                self._streams.add(stream)
            else:
                self._streams.discard(stream)

    # -- daemon ---------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        with self._translated("Docker info"):
            info: dict[str, Any] = self._api().info()
        return info

    def data_root(self) -> str:
        """Docker's data root (where images and writable layers live). Read with `docker
        info` at most once a minute: every create's admission asks for it, and `docker
        info` costs dockerd tens of milliseconds (more while it starts containers); the
        path changes only with a restart of dockerd under a new configuration."""
        now = time.monotonic()
        if self._data_root is not None and now - self._data_root[0] < _DATA_ROOT_TTL_S:
            return self._data_root[1]
        root = str(self.info().get("DockerRootDir") or "/var/lib/docker")
        self._data_root = (now, root)
        return root

    def runtimes(self) -> dict[str, RuntimeInfo]:
        """The OCI runtimes Docker has registered (`docker info` .Runtimes)."""
        return parse_runtimes(self.info().get("Runtimes"))

    def import_image(self, tar: bytes, ref: str) -> None:
        """Makes `ref` from a root filesystem tarball (`docker import`), unless it exists."""
        parsed = parse_reference(ref)
        with self._translated(f"import of {ref}"):
            if not self._api().api.images(name=ref):
                self._api().api.import_image_from_data(
                    tar, repository=parsed.repository, tag=parsed.pin
                )

    def probe_runtime(self, runtime: str, image: str, argv: list[str], timeout_s: float) -> str:
        """Runs `argv` in a throwaway container under `runtime` (no network); its output.

        Raises `DockerError` when the container does not start, exits non-zero
        or outlives `timeout_s`; the container is removed in every case.
        """
        name = f"qudata-probe-{runtime}-{os.getpid()}-{threading.get_ident()}"
        api = self._own_client(timeout_s)
        try:
            with self._translated(f"a container under the {runtime} runtime"):
                self._remove_stale_probes(api)
                host = api.create_host_config(runtime=runtime, network_mode="none")
                created = api.create_container(
                    image, argv, name=name, host_config=host, labels={LABEL_PROBE: "1"}
                )
                api.start(created["Id"])
                ended = api.wait(created["Id"], timeout=math.ceil(timeout_s))
                code = int(ended.get("StatusCode", -1))
                out = bytes(api.logs(created["Id"], stdout=True, stderr=True, tail=20))
        except AgentError as e:
            if _timed_out(e):
                raise DockerError(f"no answer within {timeout_s:g} s") from e
            raise
        finally:
            with contextlib.suppress(Exception):
                api.remove_container(name, force=True)
            api.close()
        text = out.decode("utf-8", errors="replace").strip()
        if code != 0:
            raise DockerError(f"the probe exited {code}: {text[-300:]}")
        return text

    @staticmethod
    def _remove_stale_probes(api: docker.APIClient) -> None:
        """Probe containers left by an agent killed mid-probe (older than any probe runs)."""
        cutoff = time.time() - _STALE_PROBE_S
        for found in api.containers(all=True, filters={"label": LABEL_PROBE}):
            if float(found.get("Created") or 0) < cutoff:
                with contextlib.suppress(docker.errors.APIError):
                    api.remove_container(found["Id"], force=True)

    def storage_info(self) -> StorageInfo:
        """The storage driver, its backing filesystem (overlay2's) and the data root."""
        return _storage_info(self.info())

    def writable_layer_bytes(self, container_id: str) -> int:
        """The size of the container's writable layer (`docker ps --size`'s SizeRw).

        Docker walks the layer to count it, and the tenant decides how many
        files are there: the call has a connection of its own that gives up
        after `_SIZE_TIMEOUT_S` (a `DockerError` saying so), so one layer can
        hold one slow thread that long and no longer. `container_id` is an id
        (or its prefix), not a name.
        """
        api = self._own_client(_SIZE_TIMEOUT_S)
        try:
            with self._translated(f"size of container {container_id}"):
                found = api.containers(all=True, size=True, filters={"id": container_id})
        except AgentError as e:
            if _timed_out(e):
                raise DockerError(f"measuring container {container_id} timed out") from e
            raise
        finally:
            api.close()
        for summary in found:
            if str(summary.get("Id", "")).startswith(container_id):
                return int(summary.get("SizeRw") or 0)  # Docker leaves a zero out
        raise NotFound(f"no container {container_id}")

    # -- images ---------------------------------------------------------------

    def image_present(self, ref: str) -> bool:
        try:
            with self._translated(f"image {ref}"):
                self._api().images.get(ref)
        except NotFound:
            return False
        return True

    def local_image(self, ref: str) -> LocalImage | None:
        """What Docker has under `ref` (a tag or a digest reference), or None."""
        try:
            with self._translated(f"image {ref}"):
                attrs: dict[str, Any] = self._api().api.inspect_image(ref)  # type: ignore[no-untyped-call]
        except NotFound:
            return None
        return _local_image(attrs)

    def local_images(self) -> list[LocalImage]:
        """Every image Docker has (tagged or not)."""
        with self._translated("image list"):
            found = self._api().api.images(all=False)
        return [_local_image(summary) for summary in found]

    def container_image_ids(self) -> frozenset[str]:
        """The image ids of every container, running or not, the agent's or not."""
        with self._translated("container list"):
            found = self._api().api.containers(all=True)
        return frozenset(str(c.get("ImageID") or "") for c in found) - {""}

    def remove_image(self, ref: str) -> bool:
        """Untags `ref` (or removes the image by id) without force; False if not there.

        Docker deletes the layers once the last reference is gone, and refuses
        (Conflict) while any container, even a stopped one, uses the image.
        """
        try:
            with self._translated(f"removal of image {ref}"):
                self._api().api.remove_image(ref, force=False, noprune=False)
        except NotFound:
            return False
        return True

    def registry_digest(self, ref: str, auth: RegistryCredentials | None) -> str:
        """The manifest digest the registry gives for `ref` now, asked through the daemon.

        The daemon makes the request as it would for a pull (its TLS, proxy and
        insecure-registry settings, the registry's token flow), with `auth`
        sent for this request only; no layer is downloaded. A registry that
        answers no (401, 403, 404): `RegistryRefused`; one that cannot be asked
        (the daemon reports that as a 500, also when credentials are missing):
        `RegistryUnreachable`. Messages never hold the password.
        """
        # An empty config, never None: with None the SDK would send the host's own
        # docker login (~/.docker/config.json) on a renter's behalf.
        config = auth_config(auth, parse_reference(ref)) if auth is not None else {}
        api = self._own_client(self._check_timeout_s)
        try:
            with self._translated(f"registry check of {ref}"):
                answer = api.inspect_distribution(ref, auth_config=config)  # type: ignore[no-untyped-call]
        except Unavailable as e:
            if not _timed_out(e):
                raise  # Docker itself is down
            raise RegistryUnreachable(
                f"the registry did not answer about {ref} within {self._check_timeout_s:g} s"
            ) from e
        except NotFound as e:
            raise RegistryRefused(f"the registry has no {ref}") from e
        except DockerError as e:
            cause = e.__cause__
            api_error = cause if isinstance(cause, docker.errors.APIError) else None
            text = "" if api_error is None else redact(_explain(api_error), auth)
            if api_error is not None and api_error.status_code in (401, 403):
                raise RegistryRefused(f"the registry refused access to {ref}: {text}") from e
            raise RegistryUnreachable(f"the registry could not be asked about {ref}: {text}") from e
        finally:
            api.close()
        digest = str((answer.get("Descriptor") or {}).get("digest") or "")
        if not digest:
            raise RegistryUnreachable(f"the registry gave no digest for {ref}")
        return digest

    def image_config(self, ref: str) -> ImageConfig:
        """What the (local) image runs and for which platform: its Config and Architecture."""
        with self._translated(f"image {ref}"):
            attrs: dict[str, Any] = self._api().images.get(ref).attrs
        return _image_config(attrs)

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
            raise kind(f"pull of {ref} failed: {redact(_explain(e), auth)}") from e
        except (requests.exceptions.RequestException, OSError) as e:
            if handle.aborted:
                raise DockerError(f"pull of {ref} was aborted") from e
            if _timed_out(e):
                raise DockerError(f"pull of {ref} made no progress for {inactivity_s:g} s") from e
            raise self._unreachable() from e
        except ValueError as e:  # a progress line that is not JSON
            raise DockerError(f"pull of {ref} failed: unreadable progress from Docker") from e

    # -- containers -----------------------------------------------------------

    def create(self, spec: ContainerSpec) -> str:
        """Creates (does not start) the container; its id. A taken name: Conflict."""
        with self._translated(f"create of {spec.name}"):
            container = self._api().containers.create(**_create_kwargs(spec))
        return str(container.id)

    def start(self, container_id: str) -> None:
        with self._translated(f"start of container {container_id}"):
            self._api().api.start(container_id)

    def stop(self, container_id: str, timeout_s: int = 10) -> None:
        with self._translated(f"stop of container {container_id}"):
            self._api().api.stop(container_id, timeout=timeout_s)

    def restart(self, container_id: str, timeout_s: int = 10) -> None:
        with self._translated(f"restart of container {container_id}"):
            self._api().api.restart(container_id, timeout=timeout_s)

    def set_cpuset(self, container_id: str, cpus: str) -> None:
        """Moves a container (running or not) onto these CPUs ("0-3,8"); kept across restarts."""
        with self._translated(f"cpuset of container {container_id}"):
            self._api().api.update_container(container_id, cpuset_cpus=cpus)

    def remove(self, container_id: str) -> bool:
        """Force-removes the container and its anonymous volumes; False if already gone."""
        try:
            with self._translated(f"removal of container {container_id}"):
                self._api().api.remove_container(container_id, v=True, force=True)
        except NotFound:
            return False
        return True

    def inspect(self, container_id: str) -> ContainerState:
        """The state of a container, by id or name."""
        with self._translated(f"container {container_id}"):
            attrs: dict[str, Any] = self._api().api.inspect_container(container_id)
        return _state_from_attrs(attrs)

    def list_managed(self, agent_id: str) -> list[ContainerState]:
        """Every container (running or not) labelled as this agent's."""
        with self._translated("container list"):
            found = self._api().api.containers(
                all=True, filters={"label": f"{LABEL_AGENT}={agent_id}"}
            )
        states = []
        for summary in found:
            try:
                states.append(self.inspect(summary["Id"]))
            except NotFound:
                continue  # removed between the list and the inspect
        return states

    def logs(self, container_id: str, tail: int, max_bytes: int, timeout_s: float) -> LogTail:
        """The last `tail` lines of stdout and stderr together, of which at most the last
        `max_bytes` bytes are kept.

        The tenant writes these bytes: they are streamed on a connection of the
        call's own and only the newest `max_bytes` are held (`TailBuffer`), and
        the read stops after `timeout_s` (closing that connection).
        """
        api = self._own_client(timeout_s)
        kept = TailBuffer(max_bytes)
        deadline = time.monotonic() + timeout_s
        finished = False
        try:
            with self._translated(f"logs of container {container_id}"):
                stream = api.logs(
                    container_id, stdout=True, stderr=True, tail=tail, stream=True, follow=False
                )
                for chunk in stream:
                    kept.add(chunk)
                    if time.monotonic() > deadline:
                        break
                else:
                    finished = True
        except TimeoutError:
            pass  # quiet past the read timeout: what came is what there is
        except AgentError as e:
            if not _timed_out(e):
                raise
        finally:
            api.close()
        return LogTail(kept.text(), cut=kept.dropped > 0, complete=finished)

    # -- networks -----------------------------------------------------------------

    def find_network(self, name: str) -> NetworkInfo | None:
        """The network of exactly this name, as Docker describes it."""
        with self._translated(f"network {name}"):
            for network in self._api().api.networks(names=[name]):
                if network.get("Name") == name:
                    return _network_info(name, self._api().api.inspect_network(network["Id"]))
        return None

    def create_network(self, name: str, bridge: str, labels: dict[str, str]) -> str:
        """A bridge network as `domain.network.network_options` says; its id."""
        with self._translated(f"network {name}"):
            created = self._api().api.create_network(
                name,
                driver="bridge",
                options=network_options(bridge),
                labels=labels,
                enable_ipv6=False,
                check_duplicate=True,
            )
        log.info("instance network created", extra={"network": name, "bridge": bridge})
        return str(created["Id"])

    def remove_network(self, network_id: str) -> None:
        with self._translated(f"network {network_id}"):
            self._api().api.remove_network(network_id)

    # -- events ---------------------------------------------------------------

    def events(
        self, agent_id: str, since: float | None = None, until: float | None = None
    ) -> EventStream:
        """(action, container id) for each event of this agent's containers.

        Blocks between events. Stop it with `close()` on the returned stream
        (from any thread) or `close_events()`; with `until` it also ends by
        itself once that time has passed. Times are Unix seconds.
        """
        api = self._own_client(self._timeout)
        try:
            with self._translated("Docker event stream"):
                stream = api.events(
                    since=_docker_time(since),
                    until=_docker_time(until),
                    filters={"type": "container", "label": f"{LABEL_AGENT}={agent_id}"},
                    decode=True,
                )
        except AgentError:
            api.close()
            raise
        events = EventStream(stream, api, lambda s: self._track(s, False))
        self._track(events, True)
        return events

    def close_events(self) -> None:
        """Closes every open event stream; their readers see the iteration end."""
        with self._streams_lock:
            streams = [s for s in self._streams if isinstance(s, EventStream)]
        for stream in streams:
            stream.close()

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


class EventStream:
    """An iterator of (action, container id); `close()` from any thread ends it.

    The action is Docker's verbatim ("create", "start", "die", "oom", "stop",
    "destroy", "exec_start: sh ..."). The iteration also ends, quietly, when
    `until` passes or the connection to Docker drops; a caller that needs
    every event resynchronises from `list_managed` after reconnecting.
    """

    def __init__(
        self,
        stream: docker.types.CancellableStream[dict[str, Any]],
        api: docker.APIClient,
        on_close: Callable[[EventStream], None],
    ) -> None:
        self._stream = stream
        self._api = api
        self._on_close = on_close
        self._closed = False
        self._lock = threading.Lock()
        self._items = self._generate()

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> tuple[str, str]:
        return next(self._items)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _generate(self) -> Iterator[tuple[str, str]]:
        try:
            for event in self._stream:
                seen = _container_event(event)
                if seen is not None:
                    yield seen
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError, AttributeError):  # Docker's side closed it
            self._stream.close()  # shuts the socket down, waking a blocked read
        self._api.close()
        self._on_close(self)


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


def _local_image(attrs: dict[str, Any]) -> LocalImage:
    """`docker image inspect` (or an image list entry) -> LocalImage."""
    return LocalImage(
        image_id=str(attrs.get("Id") or ""),
        tags=tuple(t for t in attrs.get("RepoTags") or () if t and t != "<none>:<none>"),
        digests=tuple(d for d in attrs.get("RepoDigests") or () if d and "<none>" not in d),
        size=int(attrs.get("Size") or 0),
    )


def _docker_time(t: float | None) -> Any:
    # Docker takes "seconds.nanoseconds"; the SDK's stubs only admit ints.
    return None if t is None else f"{t:.9f}"


def _create_kwargs(spec: ContainerSpec) -> dict[str, Any]:
    """The SDK's `containers.create` arguments for a spec: nothing else reaches Docker."""
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "name": spec.name,
        "labels": spec.labels,
        "command": list(spec.command) or None,
        "environment": dict(spec.env),
        "shm_size": spec.shm_bytes,
        "pids_limit": spec.pids_limit,
        "ports": {f"{p.container_port}/{p.protocol}": ("0.0.0.0", p.host_port) for p in spec.ports},
        "restart_policy": _restart_policy(spec),
        "log_config": docker.types.LogConfig(
            type="local",
            config={
                "max-size": str(max(1, spec.log_max_bytes // LOG_FILES)),
                "max-file": str(LOG_FILES),
            },
        ),
        "runtime": spec.runtime,
        "cap_drop": ["ALL"],
        "cap_add": list(spec.cap_add),
        "security_opt": list(spec.security_opt),
        "init": spec.init,
        "privileged": False,
        "tty": False,
        "detach": True,
    }
    if spec.nano_cpus:
        kwargs["nano_cpus"] = spec.nano_cpus
    if spec.cpuset_cpus:
        kwargs["cpuset_cpus"] = spec.cpuset_cpus
    if spec.memory_bytes:
        kwargs["mem_limit"] = kwargs["memswap_limit"] = spec.memory_bytes  # no extra swap
    if spec.gpu_uuids and spec.cdi_gpus:
        kwargs["device_requests"] = [
            docker.types.DeviceRequest(
                driver="cdi", device_ids=[cdi_device(u) for u in spec.gpu_uuids]
            )
        ]
    elif spec.gpu_uuids:
        kwargs["device_requests"] = [
            docker.types.DeviceRequest(device_ids=list(spec.gpu_uuids), capabilities=[["gpu"]])
        ]
    if spec.storage_bytes:
        kwargs["storage_opt"] = {"size": str(spec.storage_bytes)}
    if spec.network:
        kwargs["network"] = spec.network
    if spec.sysctls:
        kwargs["sysctls"] = dict(spec.sysctls)
    if spec.entrypoint is not None:
        kwargs["entrypoint"] = list(spec.entrypoint)
    if spec.user is not None:
        kwargs["user"] = spec.user
    if spec.mounts:
        kwargs["mounts"] = [
            docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only)
            for m in spec.mounts
        ]
    if spec.tmpfs:
        kwargs["tmpfs"] = dict(spec.tmpfs)
    return kwargs


def _restart_policy(spec: ContainerSpec) -> dict[str, Any]:
    policy: dict[str, Any] = {"Name": spec.restart_policy}
    if spec.restart_policy == "on-failure":
        policy["MaximumRetryCount"] = spec.restart_retries
    return policy


def _state_from_attrs(attrs: dict[str, Any]) -> ContainerState:
    """`docker inspect` output -> ContainerState."""
    state = attrs.get("State") or {}
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    status = str(state.get("Status") or "unknown")
    policy = (attrs.get("HostConfig") or {}).get("RestartPolicy") or {}
    return ContainerState(
        container_id=str(attrs["Id"]),
        name=str(attrs.get("Name") or "").lstrip("/"),
        instance_id=labels.get(LABEL_INSTANCE),
        agent_id=labels.get(LABEL_AGENT),
        status=status,
        exit_code=(
            int(state.get("ExitCode") or 0) if status in ("exited", "dead", "restarting") else None
        ),
        oom_killed=bool(state.get("OOMKilled")),
        error=str(state.get("Error") or ""),
        started_at=_when(state.get("StartedAt")),
        finished_at=_when(state.get("FinishedAt")),
        restart_count=int(attrs.get("RestartCount") or 0),
        restart_policy=str(policy.get("Name") or ""),
        max_retries=int(policy.get("MaximumRetryCount") or 0),
        created_ts=_epoch(attrs.get("Created")),
        started_ts=_epoch(state.get("StartedAt")),
        ports=_host_ports(attrs),
        pid=int(state.get("Pid") or 0) or None,
        address=_address(attrs),
        env=tuple(str(item) for item in (attrs.get("Config") or {}).get("Env") or ()),
        anonymous_volumes=_anonymous_volumes(attrs),
    )


def _address(attrs: dict[str, Any]) -> str | None:
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    for network in networks.values():
        if (network or {}).get("IPAddress"):
            return str(network["IPAddress"])
    return None


def _anonymous_volumes(attrs: dict[str, Any]) -> tuple[str, ...]:
    """Host paths of the volumes Docker made for the image's VOLUME paths (64-hex names)."""
    found = []
    for mount in attrs.get("Mounts") or ():
        name = str(mount.get("Name") or "")
        if mount.get("Type") == "volume" and _ANONYMOUS.fullmatch(name) and mount.get("Source"):
            found.append(str(mount["Source"]))
    return tuple(found)


def _when(value: Any) -> str | None:
    return None if not value or value == _NEVER else str(value)


def _epoch(value: Any) -> float | None:
    """Docker's RFC 3339 time (nanoseconds, `Z`) as Unix seconds; None for its zero time."""
    text = _when(value)
    if text is None:
        return None
    main, dot, rest = text.partition(".")
    if dot:  # keep microseconds: datetime takes no more digits
        digits = "".join(itertools.takewhile(str.isdigit, rest))
        main = f"{main}.{digits[:6]}{rest[len(digits) :]}"
    try:
        return datetime.fromisoformat(main.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _host_ports(attrs: dict[str, Any]) -> dict[str, int]:
    """ "8080/tcp" -> host port: what is bound while running, else what was asked for.

    A stopped container has no NetworkSettings.Ports, yet still owns the ports
    of its HostConfig.PortBindings (it gets them back on start).
    """
    asked = (attrs.get("HostConfig") or {}).get("PortBindings") or {}
    bound = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    ports: dict[str, int] = {}
    for source in (asked, bound):
        for key, bindings in source.items():
            host_ports = [str(b.get("HostPort") or "") for b in bindings or ()]
            numeric = [int(p) for p in host_ports if p.isdigit()]
            if numeric:
                ports[key] = numeric[0]
    return ports


# -- reading Docker's answers ------------------------------------------------------------------
# Pure functions over the Engine API's JSON, tested against answers captured from
# Docker 20.10 (API 1.41) and 26 (API 1.45): tests/unit/samples/docker/.


def _network_info(name: str, attrs: dict[str, Any]) -> NetworkInfo:
    return NetworkInfo(
        name=name,
        network_id=str(attrs["Id"]),
        driver=str(attrs.get("Driver") or ""),
        options={str(k): str(v) for k, v in (attrs.get("Options") or {}).items()},
        ipv6=bool(attrs.get("EnableIPv6")),
        internal=bool(attrs.get("Internal")),
        containers=len(attrs.get("Containers") or {}),
    )


def _image_config(attrs: dict[str, Any]) -> ImageConfig:
    """An image's Config (the only place Docker 26 keeps it: `ContainerConfig` is gone)."""
    config = attrs.get("Config") or {}
    return ImageConfig(
        entrypoint=tuple(str(a) for a in config.get("Entrypoint") or ()),
        cmd=tuple(str(a) for a in config.get("Cmd") or ()),
        user=str(config.get("User") or ""),
        env=tuple(str(item) for item in config.get("Env") or ()),
        architecture=str(attrs.get("Architecture") or ""),
        os=str(attrs.get("Os") or "linux"),
        volumes=tuple(sorted(str(path) for path in config.get("Volumes") or {})),
    )


def _container_event(event: dict[str, Any]) -> tuple[str, str] | None:
    """(action, container id) of a container event, else None.

    `Action` and `Actor.ID` are read first: the older top-level `status` and
    `id` are deprecated since API 1.44 and gone from newer engines' answers.
    """
    if event.get("Type") != "container":
        return None
    actor = event.get("Actor") or {}
    container_id = actor.get("ID") or event.get("id")
    action = event.get("Action") or event.get("status")
    return (str(action), str(container_id)) if container_id and action else None


def _storage_info(info: dict[str, Any]) -> StorageInfo:
    status = {str(k): str(v) for k, v in info.get("DriverStatus") or () if k}
    return StorageInfo(
        driver=str(info.get("Driver") or ""),
        backing_filesystem=status.get("Backing Filesystem"),
        data_root=str(info.get("DockerRootDir") or "/var/lib/docker"),
    )
