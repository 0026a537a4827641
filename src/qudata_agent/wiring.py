"""The instance side of the agent, wired in one place: `app.py` and the tests call it.

`instance_side(outside, settings)` builds every service that keeps instances
(records, images, builds, views, the instance service, the reconciler and the
parts around them) from the adapters in `Outside`, in one linear function read
top to bottom. `app.py` hands it the real adapters; the unit tests hand it
fakes of the same interfaces, so there is no second composition to drift.

What stays true: nothing here talks to the outside (no adapter is made, no
I/O is done: the adapters come in built); a part whose adapters are absent
(`None`) is off, exactly as the settings turn it off on a host (no firewall,
no SSH bundle, no metering), and the services that would use it are told so
through their constructors. Listeners sign up in their own constructors
(`services.instance_events`), not here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.config import Settings
from qudata_agent.domain.firewall import FirewallPlan
from qudata_agent.domain.gpu_health import GpuEvent
from qudata_agent.domain.image_gc import GIB, Thresholds
from qudata_agent.domain.instance import Instance
from qudata_agent.domain.netpolicy import EgressPolicy
from qudata_agent.domain.order import HostDefaults
from qudata_agent.domain.ports import PortAllocator
from qudata_agent.domain.topology import GpuTopology, HostShape
from qudata_agent.domain.volumes import Mechanism
from qudata_agent.services.builds import BuildPipeline, SpecPreparer
from qudata_agent.services.capacity import Disk, HostCapacity
from qudata_agent.services.cpu_pool import CpuPool
from qudata_agent.services.engine import Engine
from qudata_agent.services.image_cache import ImageCache
from qudata_agent.services.images import ImageService
from qudata_agent.services.instance_events import InstanceEvents
from qudata_agent.services.instances import InstanceService, holding_of
from qudata_agent.services.isolation import HostTools, Isolation
from qudata_agent.services.netmeter import Account, NetMeter, Nft, Shaper
from qudata_agent.services.network import NetworkGuard, Wall
from qudata_agent.services.pulls import PullCoordinator
from qudata_agent.services.reconciler import Reconciler
from qudata_agent.services.records import Records
from qudata_agent.services.registry_guard import RegistryGuard
from qudata_agent.services.ssh import BundleInfo, PortGate, SshFiles, SshProbe, SshService
from qudata_agent.services.storage import MountOptions, StorageGuard, StorageInfoRead, TreeBytes
from qudata_agent.services.views import InstanceViews
from qudata_agent.services.volumes import Backing, CopyTree, VolumeService


@dataclass(frozen=True)
class HostReads:
    """What the instance side reads of the host: its GPUs, cores, memory and disks."""

    topology: Callable[[bool], Awaitable[GpuTopology]]
    shape: Callable[[GpuTopology], HostShape]
    disk: Callable[[], Disk]  # Docker's data root: total and free
    docker_free_bytes: Callable[[], int | None]  # Docker's data root, free now
    free_bytes: Callable[[str], int | None]  # any path's filesystem, free
    port_free: Callable[[int, str], bool]
    gpu_health: Callable[[Instance], Sequence[GpuEvent]] | None = None
    disable_ipv6: bool = False  # the host has IPv6 (the wall is IPv4 only)
    cdi_gpus: bool = False  # the container tier's GPUs go in by CDI name


@dataclass(frozen=True)
class StorageReads:
    mount_options: MountOptions
    storage_info: StorageInfoRead  # the blocking engine's (detection runs in worker threads)
    tree_bytes: TreeBytes | None = None


@dataclass(frozen=True)
class SshParts:
    files: SshFiles
    bundle: BundleInfo | str  # the bundle, or why the host could not make one
    probe: SshProbe
    gate: PortGate | None = None


@dataclass(frozen=True)
class NetworkParts:
    wall: Wall | None  # None: QUDATA_FIREWALL=off
    plan: FirewallPlan | None


@dataclass(frozen=True)
class MeterParts:
    nft: Nft
    shaper: Shaper
    account: Account
    policy: EgressPolicy


@dataclass(frozen=True)
class VolumeParts:
    backings: Mapping[Mechanism, Backing]
    mechanism: Mechanism
    free_bytes: Callable[[], int | None]
    copy_tree: CopyTree


@dataclass(frozen=True)
class IsolationParts:
    tools: HostTools
    driver: Callable[[], Awaitable[tuple[int, str | None]]]  # (GPU count, driver version)


@dataclass(frozen=True)
class Outside:
    """The adapters, built by `app.py` (or fakes of them, built by a test)."""

    engine: Engine  # Docker's async ports: every service takes the ports it uses
    store: Store  # the database (each service names the part of it it uses)
    blocking: Blocking
    agent_id: str
    host: HostReads
    storage: StorageReads | None = None  # None: storage_gb is not watched
    ssh: SshParts | None = None  # None: no SSH into instances
    network: NetworkParts | None = None  # None: Docker's default bridge, no wall
    meter: MeterParts | None = None  # None: traffic is neither counted nor capped
    volumes: VolumeParts | None = None  # None: orders with volumes are refused
    isolation: IsolationParts | None = None  # None: the container tier only
    registry: RegistryGuard | None = None  # None: any registry host (tests only)
    reserved_ports: frozenset[int] = frozenset()  # the agent's own and the metrics port
    on_reconcile: Callable[[bool], None] = lambda _ok: None
    on_image_removed: Callable[[str], None] = lambda _reason: None


@dataclass(frozen=True)
class Tuning:
    """Knobs the tests turn; the agent runs with the defaults."""

    cleanup_retry_s: float = 0.5
    spec_preparer: SpecPreparer | None = None  # in place of the SSH service's


@dataclass(frozen=True)
class InstanceSide:
    events: InstanceEvents
    records: Records
    capacity: HostCapacity
    images: ImageService
    image_cache: ImageCache
    builds: BuildPipeline
    instances: InstanceService
    reconciler: Reconciler
    cpu_pool: CpuPool
    storage: StorageGuard | None = None
    ssh: SshService | None = None
    net: NetworkGuard | None = None
    meter: NetMeter | None = None
    volumes: VolumeService | None = None
    isolation: Isolation | None = None
    closers: tuple[Callable[[], Awaitable[None]], ...] = field(default=())

    async def close(self) -> None:
        """Stops the background work the services own (not the loops: the supervisor's)."""
        for close in self.closers:
            await close()


def instance_side(o: Outside, s: Settings, tuning: Tuning = Tuning()) -> InstanceSide:
    """Every service of the instance side, built from `o` as the settings `s` ask."""
    engine, store, blocking = o.engine, o.store, o.blocking
    events = InstanceEvents()
    records = Records(store, blocking, events)
    net = _network(o, s)
    storage = _storage(o, s)
    isolation = _isolation(o, s)
    ssh = _ssh(o, events)
    volumes = _volumes(o, records)
    capacity = _capacity(o, s, volumes)
    cpu_pool = CpuPool(records=records, capacity=capacity, engine=engine)
    meter = _meter(o, s, records)
    pulls = PullCoordinator(engine, blocking, s.pull_inactivity_s, o.host.docker_free_bytes)
    images = ImageService(engine, store, blocking, pulls, guard=o.registry)
    image_cache = _image_cache(o, s, images, events)
    preparer = tuning.spec_preparer or ssh
    builds = BuildPipeline(
        records=records,
        engine=engine,
        images=images,
        network=net,
        spec_preparer=preparer,
        cleanup_retry_s=tuning.cleanup_retry_s,
    )
    instances = InstanceService(
        records=records,
        builds=builds,
        views=_views(o, images, ssh, storage, meter),
        engine=engine,
        blocking=blocking,
        ports=PortAllocator(
            s.port_range, o.reserved_ports, o.host.port_free, fixed_range=s.fixed_ports
        ),
        capacity=capacity,
        agent_id=o.agent_id,
        storage=storage,
        volumes=volumes,
        images=images if o.registry else None,
        host=_host_defaults(o, s, net),
        stop_timeout_s=s.stop_timeout_s,
        wall=net,
        isolation=isolation,
        starting=preparer.starting if preparer else None,
    )
    reconciler = Reconciler(
        records=records,
        builds=builds,
        engine=engine,
        agent_id=o.agent_id,
        stop_timeout_s=s.stop_timeout_s,
        on_pass=o.on_reconcile,
        restore_first=volumes.restore if volumes else None,
    )
    closers = [instances.close, cpu_pool.close, pulls.close] + ([ssh.close] if ssh else [])
    closers += [meter.close] if meter else []  # after the instances: their last deletes
    return InstanceSide(
        events, records, capacity, images, image_cache, builds, instances, reconciler,
        cpu_pool, storage, ssh, net, meter, volumes, isolation, tuple(closers),
    )  # fmt: skip


def _network(o: Outside, s: Settings) -> NetworkGuard | None:
    if o.network is None:
        return None
    return NetworkGuard(
        o.engine,
        o.network.wall,
        o.blocking,
        name=s.network,
        bridge=s.bridge,
        agent_id=o.agent_id,
        wall_plan=o.network.plan,
    )


def _host_defaults(o: Outside, s: Settings, net: NetworkGuard | None) -> HostDefaults:
    return HostDefaults(
        network=net.network if net else None,
        crash_restarts=s.crash_restarts,
        log_max_bytes=s.container_log_mb * 1024**2,
        disable_ipv6=o.host.disable_ipv6,
        sandbox_runtime=s.sandbox_runtime,
        cdi_gpus=o.host.cdi_gpus,
    )


def _storage(o: Outside, s: Settings) -> StorageGuard | None:
    if o.storage is None:
        return None
    return StorageGuard(
        o.engine,
        o.store,
        o.blocking,
        storage_info=o.storage.storage_info,
        policy=s.storage_policy,
        mount_options=o.storage.mount_options,
        free_bytes=o.host.free_bytes,
        tree_bytes=o.storage.tree_bytes,
    )


def _isolation(o: Outside, s: Settings) -> Isolation | None:
    if o.isolation is None:
        return None
    return Isolation(
        engine=o.engine,
        tools=o.isolation.tools,
        blocking=o.blocking,
        driver=o.isolation.driver,
        sandbox_runtime=s.sandbox_runtime,
        toolkit_floor=s.nvidia_toolkit_min,
    )


def _ssh(o: Outside, events: InstanceEvents) -> SshService | None:
    if o.ssh is None:
        return None
    p = o.ssh
    return SshService(
        o.engine, o.store, o.blocking, p.files, p.bundle, p.probe, gate=p.gate, events=events
    )


def _volumes(o: Outside, records: Records) -> VolumeService | None:
    if o.volumes is None:
        return None

    async def instances_disk() -> int:  # storage_gb promised to instances, unwritten
        holdings = [h for h in map(holding_of, await records.all()) if h is not None]
        return sum(max(0, (h.storage_bytes or 0) - h.storage_used_bytes) for h in holdings)

    p = o.volumes
    return VolumeService(
        store=o.store,
        blocking=o.blocking,
        backings=p.backings,
        mechanism=p.mechanism,
        free_bytes=p.free_bytes,
        copy_tree=p.copy_tree,
        promised_elsewhere=instances_disk,
    )


def _capacity(o: Outside, s: Settings, volumes: VolumeService | None) -> HostCapacity:
    default_gb = s.default_storage_gb
    return HostCapacity(
        topology=o.host.topology,
        shape=o.host.shape,
        disk=o.host.disk,
        reserved_disk=volumes.promised_sync if volumes else None,
        blocking=o.blocking,
        max_instances=s.max_instances,
        reserved_cpu_cores=s.reserved_cpu_cores,
        reserved_memory_bytes=int(s.reserved_memory_gb * 1024**3),
        default_storage_bytes=None if default_gb is None else int(default_gb * 1024**3),
    )


def _meter(o: Outside, s: Settings, records: Records) -> NetMeter | None:
    if o.meter is None:
        return None
    p = o.meter
    return NetMeter(
        instances=records.all,
        nft=p.nft,
        shaper=p.shaper,
        engine=o.engine,
        account=p.account,
        blocking=o.blocking,
        bridge=s.bridge,
        policy=p.policy,
        default_mbps=s.net_mbps_default,
        events=records.events,
    )


def _image_cache(
    o: Outside, s: Settings, images: ImageService, events: InstanceEvents
) -> ImageCache:
    cache_gb = s.image_cache_gb
    return ImageCache(
        o.engine,
        o.store,
        o.blocking,
        busy=images.busy,
        keep=s.prepull,
        thresholds=Thresholds(
            min_free_bytes=int(s.image_gc_free_gb * GIB),
            max_cache_bytes=None if cache_gb is None else int(cache_gb * GIB),
        ),
        free_bytes=o.host.free_bytes,
        on_removed=o.on_image_removed,
        events=events,
    )


def _views(
    o: Outside,
    images: ImageService,
    ssh: SshService | None,
    storage: StorageGuard | None,
    meter: NetMeter | None,
) -> InstanceViews:
    return InstanceViews(
        engine=o.engine,
        images=images,
        ssh=ssh.views if ssh else None,
        gpu_health=o.host.gpu_health,
        storage=storage,
        network=meter.use if meter else None,
    )
