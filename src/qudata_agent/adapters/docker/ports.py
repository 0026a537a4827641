"""The async ports over the blocking engine: each call picks its own thread pool.

Implements `services.engine`'s ports (`Containers`, `Images`, `Daemon`,
`Networks`, `Events`) by handing each call of `DockerEngine` to
`blocking.Blocking`. The pool belongs to the call, declared here once:
`quick` for what answers in milliseconds (inspect, the image reads and an
untag, `docker info`, the network calls), `slow` for what may block for
seconds or minutes (create, start, stop, restart, remove, the full listing,
cpuset updates, logs, a layer's size, pulls, registry checks, imports,
runtime probes, event streams).

What stays true: no Docker call runs on the event loop thread; nothing here
holds state of its own, so tests wrap their fake engines in the same ports.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from qudata_agent.adapters.docker.engine import DockerEngine
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerSpec, ContainerState
from qudata_agent.domain.image_access import LocalImage
from qudata_agent.domain.isolation import RuntimeInfo
from qudata_agent.domain.log_tail import LogTail
from qudata_agent.domain.network import NetworkInfo
from qudata_agent.domain.pull_progress import PullProgress
from qudata_agent.domain.registry_credentials import RegistryCredentials
from qudata_agent.domain.ssh_init import ImageConfig
from qudata_agent.domain.storage import StorageInfo


class _Port:
    def __init__(self, engine: DockerEngine, blocking: Blocking) -> None:
        self._engine = engine
        self._blocking = blocking


class ContainerPort(_Port):
    async def create(self, spec: ContainerSpec) -> str:
        return await self._blocking.slow(self._engine.create, spec)

    async def start(self, container_id: str) -> None:
        await self._blocking.slow(self._engine.start, container_id)

    async def stop(self, container_id: str, timeout_s: int = 10) -> None:
        await self._blocking.slow(self._engine.stop, container_id, timeout_s)

    async def restart(self, container_id: str, timeout_s: int = 10) -> None:
        await self._blocking.slow(self._engine.restart, container_id, timeout_s)

    async def remove(self, container_id: str) -> bool:
        return await self._blocking.slow(self._engine.remove, container_id)

    async def inspect(self, container_id: str) -> ContainerState:
        return await self._blocking.quick(self._engine.inspect, container_id)

    async def list_managed(self, agent_id: str) -> list[ContainerState]:
        return await self._blocking.slow(self._engine.list_managed, agent_id)

    async def set_cpuset(self, container_id: str, cpus: str) -> None:
        await self._blocking.slow(self._engine.set_cpuset, container_id, cpus)

    async def logs(self, container_id: str, tail: int, max_bytes: int, timeout_s: float) -> LogTail:
        return await self._blocking.slow(
            self._engine.logs, container_id, tail, max_bytes, timeout_s
        )

    async def writable_layer_bytes(self, container_id: str) -> int:
        return await self._blocking.slow(self._engine.writable_layer_bytes, container_id)


class ImagePort(_Port):
    async def local_image(self, ref: str) -> LocalImage | None:
        return await self._blocking.quick(self._engine.local_image, ref)

    async def local_images(self) -> list[LocalImage]:
        return await self._blocking.quick(self._engine.local_images)

    async def container_image_ids(self) -> frozenset[str]:
        return await self._blocking.quick(self._engine.container_image_ids)

    async def remove_image(self, ref: str) -> bool:
        return await self._blocking.quick(self._engine.remove_image, ref)

    async def image_config(self, ref: str) -> ImageConfig:
        return await self._blocking.quick(self._engine.image_config, ref)

    async def registry_digest(self, ref: str, auth: RegistryCredentials | None) -> str:
        return await self._blocking.slow(self._engine.registry_digest, ref, auth)

    async def pull(
        self,
        ref: str,
        auth: RegistryCredentials | None,
        on_progress: Callable[[PullProgress], None],
        inactivity_s: float,
    ) -> None:
        await self._blocking.slow(self._engine.pull, ref, auth, on_progress, inactivity_s)

    async def import_image(self, tar: bytes, ref: str) -> None:
        await self._blocking.slow(self._engine.import_image, tar, ref)


class DaemonPort(_Port):
    async def info(self) -> dict[str, Any]:
        return await self._blocking.quick(self._engine.info)

    async def data_root(self) -> str:
        return await self._blocking.quick(self._engine.data_root)

    async def storage_info(self) -> StorageInfo:
        return await self._blocking.quick(self._engine.storage_info)

    async def runtimes(self) -> dict[str, RuntimeInfo]:
        return await self._blocking.quick(self._engine.runtimes)

    async def probe_runtime(
        self, runtime: str, image: str, argv: list[str], timeout_s: float
    ) -> str:
        return await self._blocking.slow(
            self._engine.probe_runtime, runtime, image, argv, timeout_s
        )


class NetworkPort(_Port):
    async def find_network(self, name: str) -> NetworkInfo | None:
        return await self._blocking.quick(self._engine.find_network, name)

    async def create_network(self, name: str, bridge: str, labels: dict[str, str]) -> str:
        return await self._blocking.quick(self._engine.create_network, name, bridge, labels)

    async def remove_network(self, network_id: str) -> None:
        await self._blocking.quick(self._engine.remove_network, network_id)


class EventPort(_Port):
    async def events(
        self, agent_id: str, since: float, until: float
    ) -> AsyncIterator[tuple[str, str]]:
        """(action, container id) of each event between `since` and `until` (Unix seconds).

        One blocking read of the window in the slow pool hands events over as
        they come; the iteration ends with the window, and raises the
        stream's error (Docker gone) once the events read before it are out.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

        def read_window() -> None:
            with contextlib.closing(self._engine.events(agent_id, since, until)) as stream:
                for item in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, item)

        reader = asyncio.ensure_future(self._blocking.slow(read_window))
        while not (reader.done() and queue.empty()):
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        reader.result()


class DockerPorts(ContainerPort, ImagePort, DaemonPort, NetworkPort, EventPort):
    """Every port over one engine (what the wiring hands to each service)."""
