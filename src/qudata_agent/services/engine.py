"""The Docker engine as the services see it: five async ports, declared once.

`Containers`, `Images`, `Daemon`, `Networks` and `Events` are what services
and loops take in their constructors; the adapter (`adapters.docker.ports`)
implements them over the blocking engine, and each of its methods picks its
own thread pool, so a caller just awaits `engine.start(id)`. A service names
only the ports it uses; tests wrap their fakes in the same adapter.

What stays true: services never see the blocking engine, the SDK or the
pools; every method here may raise the agent's errors (`NotFound`,
`Conflict`, `Unavailable`, the adapter's `DockerError`) and nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from qudata_agent.domain.container_spec import ContainerSpec, ContainerState
from qudata_agent.domain.image_access import LocalImage
from qudata_agent.domain.isolation import RuntimeInfo
from qudata_agent.domain.log_tail import LogTail
from qudata_agent.domain.network import NetworkInfo
from qudata_agent.domain.pull_progress import PullProgress
from qudata_agent.domain.registry_credentials import RegistryCredentials
from qudata_agent.domain.ssh_init import ImageConfig
from qudata_agent.domain.storage import StorageInfo


class Containers(Protocol):
    """Containers: create, the lifecycle, what Docker says of them, logs, layer size."""

    async def create(self, spec: ContainerSpec) -> str: ...

    async def start(self, container_id: str) -> None: ...

    async def stop(self, container_id: str, timeout_s: int = 10) -> None: ...

    async def restart(self, container_id: str, timeout_s: int = 10) -> None: ...

    async def remove(self, container_id: str) -> bool: ...

    async def inspect(self, container_id: str) -> ContainerState: ...

    async def list_managed(self, agent_id: str) -> list[ContainerState]: ...

    async def set_cpuset(self, container_id: str, cpus: str) -> None: ...

    async def logs(
        self, container_id: str, tail: int, max_bytes: int, timeout_s: float
    ) -> LogTail: ...

    async def writable_layer_bytes(self, container_id: str) -> int: ...


class Images(Protocol):
    """Images: what Docker has, pulls, removal, a registry's digest, an image's config."""

    async def local_image(self, ref: str) -> LocalImage | None: ...

    async def local_images(self) -> list[LocalImage]: ...

    async def container_image_ids(self) -> frozenset[str]: ...

    async def remove_image(self, ref: str) -> bool: ...

    async def image_config(self, ref: str) -> ImageConfig: ...

    async def registry_digest(self, ref: str, auth: RegistryCredentials | None) -> str: ...

    async def pull(
        self,
        ref: str,
        auth: RegistryCredentials | None,
        on_progress: Callable[[PullProgress], None],  # called from the pulling thread
        inactivity_s: float,
    ) -> None: ...

    async def import_image(self, tar: bytes, ref: str) -> None: ...


class Daemon(Protocol):
    """What dockerd says about itself, and a start check of a runtime."""

    async def info(self) -> dict[str, Any]: ...

    async def data_root(self) -> str: ...

    async def storage_info(self) -> StorageInfo: ...

    async def runtimes(self) -> dict[str, RuntimeInfo]: ...

    async def probe_runtime(
        self, runtime: str, image: str, argv: list[str], timeout_s: float
    ) -> str: ...


class Networks(Protocol):
    """The agent's bridge network."""

    async def find_network(self, name: str) -> NetworkInfo | None: ...

    async def create_network(self, name: str, bridge: str, labels: dict[str, str]) -> str: ...

    async def remove_network(self, network_id: str) -> None: ...


class Events(Protocol):
    """Docker's events of the agent's containers."""

    def events(
        self, agent_id: str, since: float, until: float
    ) -> AsyncIterator[tuple[str, str]]: ...


class Engine(Containers, Images, Daemon, Networks, Events, Protocol):
    """Every port in one: what a part that uses several of them takes."""
