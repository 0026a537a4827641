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
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    RegistryAuth,
    auth_config,
    redact,
    split_reference,
    stream_error,
)
from qudata_agent.domain.container_spec import (
    LABEL_AGENT,
    LABEL_INSTANCE,
    ContainerSpec,
    ContainerState,
)
from qudata_agent.domain.ssh_init import ImageConfig
from qudata_agent.domain.storage import StorageInfo
from qudata_agent.errors import AgentError, Conflict, NotFound, Unavailable

__all__ = ["DockerEngine", "DockerError", "EventStream", "PullProgress", "RegistryAuth"]

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
_UNREACHABLE = (docker.errors.DockerException, requests.exceptions.RequestException)
_NEVER = "0001-01-01T00:00:00Z"  # Docker's zero time: "did not happen"
_POOL_SIZE = 32  # quick and slow pools together never wait for a connection


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


class DockerEngine:
    def __init__(self, base_url: str | None = None, timeout_s: int = 30) -> None:
        self._base_url = base_url or DEFAULT_SOCKET
        self._timeout = timeout_s
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()
        self._streams: set[_Closable] = set()  # pulls and event streams in flight
        self._streams_lock = threading.Lock()

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
        """Docker's data root (where images and writable layers live)."""
        return str(self.info().get("DockerRootDir") or "/var/lib/docker")

    def storage_info(self) -> StorageInfo:
        """The storage driver, its backing filesystem (overlay2's) and the data root."""
        info = self.info()
        status = {str(k): str(v) for k, v in info.get("DriverStatus") or () if k}
        return StorageInfo(
            driver=str(info.get("Driver") or ""),
            backing_filesystem=status.get("Backing Filesystem"),
            data_root=str(info.get("DockerRootDir") or "/var/lib/docker"),
        )

    def writable_layer_bytes(self, container_id: str) -> int:
        """The size of the container's writable layer (`docker ps --size`'s SizeRw).

        Docker walks the layer to count it: slow for a large one, so call it
        from the slow pool, and not often. `container_id` is an id (or its
        prefix), not a name.
        """
        with self._translated(f"size of container {container_id}"):
            found = self._api().api.containers(all=True, size=True, filters={"id": container_id})
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

    def image_config(self, ref: str) -> ImageConfig:
        """What the (local) image runs and for which platform: its Config and Architecture."""
        with self._translated(f"image {ref}"):
            attrs: dict[str, Any] = self._api().images.get(ref).attrs
        config = attrs.get("Config") or {}
        return ImageConfig(
            entrypoint=tuple(str(a) for a in config.get("Entrypoint") or ()),
            cmd=tuple(str(a) for a in config.get("Cmd") or ()),
            user=str(config.get("User") or ""),
            env=tuple(str(item) for item in config.get("Env") or ()),
            architecture=str(attrs.get("Architecture") or ""),
            os=str(attrs.get("Os") or "linux"),
        )

    def pull(
        self,
        ref: str,
        auth: RegistryAuth | None,
        on_progress: Callable[[PullProgress], None],
        inactivity_s: float,
    ) -> None:
        """Pulls `ref`, reporting progress; gives up after `inactivity_s` of silence.

        Every read from Docker is bounded by `inactivity_s` (the SDK's own
        `pull()` sets no read timeout at all, so the request is made here on a
        client of its own). `close()` aborts a pull in flight (one still waiting
        for Docker's first answer ends at once when that answer comes).
        """
        repository, tag = split_reference(ref)
        api = self._own_client(inactivity_s)
        handle = _PullHandle()
        self._track(handle, True)
        try:
            with self._pull_errors(ref, auth, inactivity_s, handle):
                response = _open_pull(api, repository, tag, auth, inactivity_s)
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
        auth: RegistryAuth | None,
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

    def logs(self, container_id: str, tail: int) -> str:
        """The last `tail` lines of stdout and stderr together."""
        with self._translated(f"logs of container {container_id}"):
            raw = self._api().api.logs(container_id, stdout=True, stderr=True, tail=tail)
        return bytes(raw).decode("utf-8", errors="replace")

    # -- networks -----------------------------------------------------------------

    def ensure_network(self, name: str, bridge: str, labels: dict[str, str]) -> str:
        """The agent's bridge network for instances (made once); its id.

        Inter-container traffic is off on it: instances never see each other.
        """
        with self._translated(f"network {name}"):
            found = self._api().api.networks(names=[name])
            for network in found:
                if network.get("Name") == name:
                    return str(network["Id"])
            created = self._api().api.create_network(
                name,
                driver="bridge",
                options={
                    "com.docker.network.bridge.name": bridge,
                    "com.docker.network.bridge.enable_icc": "false",
                },
                labels=labels,
                check_duplicate=True,
            )
        log.info("instance network created", extra={"network": name, "bridge": bridge})
        return str(created["Id"])

    # -- inside a container -----------------------------------------------------

    def exec_run(
        self, container_id: str, argv: list[str], timeout_s: float = 30
    ) -> tuple[int, str]:
        """Runs `argv` as root in the running container; (exit code, last 4 KiB of output).

        Has its own connection with a read timeout of `timeout_s`, so a long
        quiet command (a package install) neither trips nor holds the shared one.
        """
        api = self._own_client(timeout_s)
        try:
            with self._translated(f"exec in container {container_id}"):
                exec_id = api.exec_create(container_id, argv, user="root", tty=False)["Id"]
                output = api.exec_start(exec_id, demux=False)
                code = api.exec_inspect(exec_id).get("ExitCode")
        except AgentError as e:
            if _timed_out(e):
                raise DockerError(f"command in container {container_id} timed out") from e
            raise
        finally:
            api.close()
        text = bytes(output or b"").decode("utf-8", errors="replace")
        return (-1 if code is None else int(code)), text[-4096:]

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
                if event.get("Type") != "container":
                    continue
                actor = event.get("Actor") or {}
                container_id = actor.get("ID") or event.get("id")
                action = event.get("Action") or event.get("status")
                if container_id and action:
                    yield str(action), str(container_id)
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
    repository: str,
    tag: str,
    auth: RegistryAuth | None,
    inactivity_s: float,
) -> requests.Response:
    headers: dict[str, str | bytes] = {}
    if auth is not None:
        headers["X-Registry-Auth"] = docker.auth.encode_header(auth_config(auth, repository))
    response = api.post(
        f"{api.base_url}/v{api.api_version}/images/create",
        params={"fromImage": repository, "tag": tag},
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
    auth: RegistryAuth | None,
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
        "restart_policy": {"Name": spec.restart_policy},
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
    if spec.memory_bytes:
        kwargs["mem_limit"] = kwargs["memswap_limit"] = spec.memory_bytes  # no extra swap
    if spec.gpu_uuids:
        kwargs["device_requests"] = [
            docker.types.DeviceRequest(device_ids=list(spec.gpu_uuids), capabilities=[["gpu"]])
        ]
    if spec.storage_bytes:
        kwargs["storage_opt"] = {"size": str(spec.storage_bytes)}
    if spec.network:
        kwargs["network"] = spec.network
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


def _state_from_attrs(attrs: dict[str, Any]) -> ContainerState:
    """`docker inspect` output -> ContainerState."""
    state = attrs.get("State") or {}
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    status = str(state.get("Status") or "unknown")
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
        ports=_host_ports(attrs),
        pid=int(state.get("Pid") or 0) or None,
        env=tuple(str(item) for item in (attrs.get("Config") or {}).get("Env") or ()),
    )


def _when(value: Any) -> str | None:
    return None if not value or value == _NEVER else str(value)


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
