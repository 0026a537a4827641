"""Builds every part of the agent, wires them together, and runs it until a signal.

The only module that constructs adapters. Start order: state directory and
database (identity), secrets, the listening socket, the HTTP server, and only
then the loops that talk to the control plane, so the port it is told answers.
Stop order (SIGTERM/SIGINT): the server stops accepting, the loops are
cancelled and awaited, adapters are closed. What stays true: the agent's own
stop never stops, removes or otherwise touches a tenant's container.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import uuid
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from qudata_agent import __version__
from qudata_agent.acceptor import PortPolicy, raise_open_files_limit
from qudata_agent.adapters.cgroups import CgroupReader
from qudata_agent.adapters.control_plane import ControlPlane, ControlPlaneError
from qudata_agent.adapters.docker import DockerEngine
from qudata_agent.adapters.firewall import Firewall
from qudata_agent.adapters.host import (
    HostCounters,
    HostProbe,
    default_route_address,
    disk_free_bytes,
    disk_usage_bytes,
    host_memory_bytes,
    host_shape,
    ipv6_available,
    machine_fingerprint,
    mount_options,
)
from qudata_agent.adapters.meter_file import MeterFile
from qudata_agent.adapters.netcheck import port_is_free
from qudata_agent.adapters.nftables import Nftables
from qudata_agent.adapters.nvml import Nvml
from qudata_agent.adapters.port_gate import IptablesPortGate
from qudata_agent.adapters.public_address import PublicAddress
from qudata_agent.adapters.resolver import own_addresses, resolve
from qudata_agent.adapters.runtimes import RuntimeTools, cdi_spec_texts
from qudata_agent.adapters.secrets import SecretFile, ensure_private_dir
from qudata_agent.adapters.ssh_bundle import Bundle, SshBundle
from qudata_agent.adapters.ssh_files import InstanceSshFiles
from qudata_agent.adapters.ssh_probe import HostSshProbe
from qudata_agent.adapters.store import Store
from qudata_agent.adapters.systemd import Notifier
from qudata_agent.adapters.tls import TlsError, TlsKeeper
from qudata_agent.adapters.traffic_control import TrafficControl
from qudata_agent.adapters.tree_size import tree_bytes
from qudata_agent.adapters.volume_fs import LoopVolumes, XfsProjectVolumes, copy_tree, fs_facts
from qudata_agent.adapters.wireguard import WireGuard, ensure_key
from qudata_agent.api.app import ApiDeps, create_app
from qudata_agent.blocking import Blocking
from qudata_agent.config import Settings
from qudata_agent.domain.backoff import Backoff
from qudata_agent.domain.gpu_health import HealthRecord
from qudata_agent.domain.image_gc import GIB, Thresholds
from qudata_agent.domain.inventory import init_host_payload
from qudata_agent.domain.isolation import cdi_refusal
from qudata_agent.domain.order import HostDefaults
from qudata_agent.domain.ports import PortAllocator
from qudata_agent.domain.tls import TlsMode, certificate_names
from qudata_agent.domain.tunnel import Routing, TunnelConfigError, block_problem, build
from qudata_agent.domain.volumes import Mechanism, choose_mechanism
from qudata_agent.errors import AgentError, Unavailable
from qudata_agent.loops.docker_events import docker_events_loop
from qudata_agent.loops.gpu_events import gpu_events_loop
from qudata_agent.loops.images import image_gc_loop, prepull_loop
from qudata_agent.loops.inventory import inventory_loop
from qudata_agent.loops.metrics_listener import metrics_listener
from qudata_agent.loops.periodic import run_every
from qudata_agent.loops.reconcile import reconcile_loop
from qudata_agent.loops.registration import registration_loop
from qudata_agent.loops.stats import StatsReporter
from qudata_agent.loops.supervisor import Supervisor
from qudata_agent.loops.watchdog import ping_interval_s, watchdog_loop
from qudata_agent.metrics import Metrics
from qudata_agent.server import (
    PortUnavailable,
    bind_socket,
    listen,
    make_server,
    wait_started,
)
from qudata_agent.services.builds import BuildPipeline
from qudata_agent.services.capacity import Disk, HostCapacity
from qudata_agent.services.cpu_pool import CpuPool
from qudata_agent.services.credentials import Credentials
from qudata_agent.services.image_cache import ImageCache
from qudata_agent.services.images import ImageService
from qudata_agent.services.instances import InstanceService, holding_of
from qudata_agent.services.isolation import Isolation
from qudata_agent.services.netmeter import NetMeter
from qudata_agent.services.network import NetworkGuard
from qudata_agent.services.pulls import PullCoordinator
from qudata_agent.services.reconciler import Reconciler
from qudata_agent.services.records import Records
from qudata_agent.services.registration import Identity, Registrar
from qudata_agent.services.registry_guard import RegistryGuard
from qudata_agent.services.ssh import SshService
from qudata_agent.services.storage import StorageGuard
from qudata_agent.services.telemetry import HostSize, Telemetry
from qudata_agent.services.tunnel import Tunnel
from qudata_agent.services.views import InstanceViews
from qudata_agent.services.volumes import Backing, VolumeService
from qudata_agent.state_dir import (
    AGENT_SECRET_FILE,
    API_KEY_FILE,
    DB_FILE,
    METER_FILE,
    TUNNEL_KEY_FILE,
    Meta,
)
from qudata_agent.wall import egress_policy, wall_plan

log = logging.getLogger(__name__)

AGENT_ID_KEY = Meta.AGENT_ID
AGENT_PORT_KEY = Meta.AGENT_PORT
FALLBACK_DOCKER_ROOT = "/var/lib/docker"
TUNNEL_CHECK_S = 5.0
TLS_RENEWAL_CHECK_S = 6 * 3600.0


def _docker_disk_free(docker: DockerEngine) -> int | None:
    """The free space of Docker's data root now; None when Docker cannot say where it is."""
    try:
        return disk_free_bytes(docker.data_root())
    except AgentError:
        return None


@dataclass(frozen=True)
class _Services:
    records: Records
    instances: InstanceService
    reconciler: Reconciler
    ssh: SshService
    storage: StorageGuard
    net: NetworkGuard
    images: ImageService
    image_cache: ImageCache
    cpu_pool: CpuPool
    meter: NetMeter
    volumes: VolumeService
    isolation: Isolation


@dataclass
class _Parts:
    store: Store
    credentials: Credentials
    blocking: Blocking
    docker: DockerEngine
    nvml: Nvml
    agent_id: str
    api_key: str | None
    metrics: Metrics = field(default_factory=Metrics)
    health: HealthRecord = field(default_factory=HealthRecord)  # GPU health problems
    tunnel: Tunnel | None = None  # tunnel mode


def _open_state(settings: Settings) -> _Parts:
    ensure_private_dir(settings.state_dir)
    store = Store.open(settings.state_dir / DB_FILE)
    credentials = Credentials(
        SecretFile(settings.state_dir / AGENT_SECRET_FILE),
        SecretFile(settings.state_dir / API_KEY_FILE),
    )
    return _Parts(
        store=store,
        credentials=credentials,
        blocking=Blocking(),
        docker=DockerEngine(settings.docker_host),
        nvml=Nvml(),
        agent_id=store.get_or_create(AGENT_ID_KEY, lambda: str(uuid.uuid4())),
        api_key=credentials.api_key(settings.api_key),
    )


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = asyncio.Event()
        self._server: Any = None
        self._isolation: Isolation | None = None

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None and not self._stop.is_set():
            log.info("stop requested", extra={"signal": signal.Signals(signum).name})
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True

    async def _inventory(self, parts: _Parts) -> dict[str, Any]:
        try:
            root = await parts.blocking.quick(parts.docker.data_root)
        except Unavailable as e:
            log.warning(
                "Docker unreachable; disk size taken from the default data root",
                extra={"error": e.message, "path": FALLBACK_DOCKER_ROOT},
            )
            root = FALLBACK_DOCKER_ROOT
        probe = HostProbe(parts.nvml)
        inventory = await parts.blocking.quick(probe.inventory, root)
        tiers = None if self._isolation is None else (await self._isolation.offer()).names()
        return init_host_payload(inventory, tiers)

    async def _address(self, parts: _Parts) -> str | None:
        """The public IPv4: the relay's in tunnel mode, the configured one, the lookups',
        else the default route's."""
        s = self.settings
        if parts.tunnel is not None and parts.tunnel.config is not None:
            return parts.tunnel.config.public_address
        if s.address:
            return s.address
        lookups = PublicAddress(s.address_lookup_urls, user_agent=f"qudata-agent/{__version__}")
        return await lookups.lookup() or await parts.blocking.quick(default_route_address)

    def _registrar(
        self, parts: _Parts, cp: ControlPlane, address: str | None, tls: TlsKeeper | None
    ) -> Registrar:
        identity = Identity(
            agent_id=parts.agent_id,
            fingerprint=machine_fingerprint(),
            address=address,
            tunnel_pubkey=parts.tunnel.public_key if parts.tunnel else None,
            tls_pubkey_sha256=tls.identity.pin if tls else None,
        )
        return Registrar(
            cp,
            parts.credentials,
            parts.store,
            identity,
            lambda: self._inventory(parts),
            parts.blocking,
        )

    async def run(self) -> int:
        s = self.settings
        try:
            parts = await asyncio.to_thread(_open_state, s)
        except (OSError, AgentError) as e:
            log.error(
                "cannot open the state directory", extra={"path": str(s.state_dir), "error": str(e)}
            )
            return 1
        try:
            return await self._serve(parts)
        finally:
            parts.docker.close()
            parts.nvml.close()
            parts.blocking.close()
            parts.store.close()

    def _announce_standalone(self, parts: _Parts) -> None:
        parts.credentials.ensure_secret()
        path = parts.credentials.secret_path
        log.info("standalone mode: no API key, no control-plane calls; agent secret in %s", path)
        print(
            f"qudata-agent: standalone mode; agent secret file: {path}", file=sys.stderr, flush=True
        )

    def _listen(self, parts: _Parts) -> socket.socket:
        s = self.settings
        previous = parts.store.get(AGENT_PORT_KEY)
        sock = listen(
            s.agent_host,
            s.agent_port,
            int(previous) if previous else None,
            s.port_range,
            inside=bool(s.tunnel),
        )
        parts.store.set(AGENT_PORT_KEY, str(sock.getsockname()[1]))
        return sock

    def _network(self, parts: _Parts) -> NetworkGuard:
        s = self.settings
        return NetworkGuard(
            parts.docker,
            Firewall() if s.firewall else None,
            parts.blocking,
            name=s.network,
            bridge=s.bridge,
            agent_id=parts.agent_id,
            wall_plan=wall_plan(s),
        )

    def _meter(self, parts: _Parts, records: Records) -> NetMeter:
        s = self.settings
        meter = NetMeter(
            instances=records.all,
            nft=Nftables(s.bridge),
            shaper=TrafficControl(),
            engine=parts.docker,
            account=MeterFile(s.state_dir / METER_FILE),
            blocking=parts.blocking,
            bridge=s.bridge,
            policy=egress_policy(s),
            default_mbps=s.net_mbps_default,
        )
        records.on_new_run(meter.poke)  # a new run has a new veth: caps and maps at once
        records.on_removed(meter.poke)  # a deleted instance's last count, then its counters go
        parts.metrics.follow_network(meter)
        return meter

    def _storage(self, parts: _Parts) -> StorageGuard:
        return StorageGuard(
            parts.docker,
            parts.store,
            parts.blocking,
            policy=self.settings.storage_policy,
            mount_options=mount_options,
            free_bytes=disk_free_bytes,
            tree_bytes=lambda path: tree_bytes(path).bytes,
        )

    async def _ssh(self, parts: _Parts) -> SshService:
        """The SSH service, with the SSH bundle made (once per OpenSSH of the host)."""
        root = self.settings.state_dir / "ssh"
        bundle: Bundle | str
        try:
            bundle = await parts.blocking.slow(SshBundle(root / "bundles").ensure)
        except (AgentError, OSError) as e:
            error = e.message if isinstance(e, AgentError) else str(e)
            log.error("no SSH for instances: the SSH bundle cannot be made", extra={"error": error})
            bundle = f"the agent's SSH is not available on this host: {error}"
        files = InstanceSshFiles(root / "instances")
        gate = await self._port_gate(parts)
        return SshService(
            parts.docker, parts.store, parts.blocking, files, bundle, HostSshProbe(), gate=gate
        )

    async def _port_gate(self, parts: _Parts) -> IptablesPortGate | None:
        """The SSH port gate (`domain.port_gate`), where the agent keeps a firewall."""
        if not self.settings.firewall:
            return None
        gate = IptablesPortGate(parts.agent_id)
        try:
            stale = await parts.blocking.quick(gate.setup)
        except AgentError as e:
            log.warning("ssh ports are not gated", extra={"error": e.message})
            return None
        if stale:
            log.info("ssh port gates left by an earlier run removed", extra={"ports": stale})
        return gate

    def _volumes(self, parts: _Parts, records: Records) -> VolumeService:
        """Volumes under the state directory, sized the way this host's filesystem allows."""
        root = self.settings.state_dir / "volumes"
        ensure_private_dir(root)
        found = fs_facts(root)
        mechanism, why = choose_mechanism(None if found is None else found[0])
        backings: dict[Mechanism, Backing] = {Mechanism.LOOP: LoopVolumes(root)}
        if found is not None:
            backings[Mechanism.XFS_PROJECT] = XfsProjectVolumes(root, found[1])
        log.info("volumes", extra={"mechanism": mechanism.value, "why": why, "root": str(root)})

        async def instances_disk() -> int:  # storage_gb promised to instances, unwritten
            holdings = [h for h in map(holding_of, await records.all()) if h is not None]
            return sum(max(0, (h.storage_bytes or 0) - h.storage_used_bytes) for h in holdings)

        return VolumeService(
            store=parts.store,
            blocking=parts.blocking,
            backings=backings,
            mechanism=mechanism,
            free_bytes=lambda: disk_free_bytes(str(root)),
            copy_tree=copy_tree,
            promised_elsewhere=instances_disk,
        )

    def _isolation_service(self, parts: _Parts) -> Isolation:
        async def driver() -> tuple[int, str | None]:
            report = await parts.nvml.report_async()
            return len(report.gpus), report.driver_version

        return Isolation(
            engine=parts.docker,
            tools=RuntimeTools(),
            blocking=parts.blocking,
            driver=driver,
            sandbox_runtime=self.settings.sandbox_runtime,
            toolkit_floor=self.settings.nvidia_toolkit_min,
        )

    async def _cdi_gpus(self, parts: _Parts) -> bool:
        """Whether the container tier's GPUs go in by CDI name (decided once, at start)."""
        try:
            info = await parts.blocking.quick(parts.docker.info)
            gpus = await parts.nvml.uuids_async()
        except AgentError:
            return False
        if not gpus:
            return False
        dirs = [str(d) for d in info.get("CDISpecDirs") or ()]
        texts = await parts.blocking.quick(cdi_spec_texts, dirs)
        why = cdi_refusal(str(info.get("ServerVersion") or ""), dirs, texts, gpus)
        log.info("GPU injection", extra={"cdi": why is None, "why_not": why})
        return why is None

    async def _services(self, parts: _Parts, agent_port: int) -> _Services:
        """The instance side of the agent: records, builds, reconcile, views, SSH, storage."""
        s = self.settings
        net = self._network(parts)
        storage = self._storage(parts)
        isolation = self._isolation = self._isolation_service(parts)
        ssh = await self._ssh(parts)
        records = Records(parts.store, parts.blocking)
        records.on_new_run(ssh.on_new_run)
        volumes = self._volumes(parts, records)
        capacity = self._capacity(parts, volumes)
        cpu_pool = CpuPool(
            records=records, capacity=capacity, engine=parts.docker, blocking=parts.blocking
        )
        records.on_new_run(cpu_pool.poke)  # a pinned instance may have just come up
        records.on_removed(cpu_pool.poke)  # its cores may be free again
        records.on_change(ssh.prune_soon)  # a deleted instance's SSH directory goes too
        meter = self._meter(parts, records)
        ssh.prune_soon()
        pulls = PullCoordinator(
            parts.docker,
            parts.blocking,
            s.pull_inactivity_s,
            free_bytes=lambda: _docker_disk_free(parts.docker),
        )
        guard = RegistryGuard(
            allow=s.registry_allow,
            resolve=resolve,
            own_addresses=own_addresses,
            public_address=s.address,
        )
        images = ImageService(parts.docker, parts.store, parts.blocking, pulls, guard=guard)
        image_cache = self._image_cache(parts, images)
        records.on_change(image_cache.poke)  # a delete may leave an image unused
        builds = BuildPipeline(
            records=records,
            engine=parts.docker,
            blocking=parts.blocking,
            images=images,
            prepare_network=net.prepare,
            prepare_spec=ssh.prepare,
        )
        views = InstanceViews(
            engine=parts.docker,
            blocking=parts.blocking,
            images=images,
            ssh=ssh.view,
            gpu_health=lambda i: parts.health.problems(i.gpus, since=i.created_at),
            storage=storage,
            network=meter.use,
        )
        instances = InstanceService(
            records=records,
            builds=builds,
            views=views,
            engine=parts.docker,
            blocking=parts.blocking,
            ports=PortAllocator(
                s.port_range,
                frozenset({agent_port} | ({s.metrics_listen[1]} if s.metrics_listen else set())),
                port_is_free,
                fixed_range=s.fixed_ports,
            ),
            capacity=capacity,
            agent_id=parts.agent_id,
            storage=storage,
            volumes=volumes,
            images=images,
            host=HostDefaults(
                network=net.network,
                crash_restarts=s.crash_restarts,
                log_max_bytes=s.container_log_mb * 1024**2,
                disable_ipv6=ipv6_available(),
                sandbox_runtime=s.sandbox_runtime,
                cdi_gpus=await self._cdi_gpus(parts),
            ),
            stop_timeout_s=s.stop_timeout_s,
            wall=net,
            isolation=isolation,
            before_start=ssh.before_start,
        )
        reconciler = Reconciler(
            records=records,
            builds=builds,
            engine=parts.docker,
            blocking=parts.blocking,
            agent_id=parts.agent_id,
            stop_timeout_s=s.stop_timeout_s,
            on_pass=parts.metrics.reconcile_ran,
            restore_first=volumes.restore,
        )
        return _Services(
            records, instances, reconciler, ssh, storage, net, images, image_cache, cpu_pool,
            meter, volumes, isolation,
        )  # fmt: skip

    def _image_cache(self, parts: _Parts, images: ImageService) -> ImageCache:
        s = self.settings
        cache_gb = s.image_cache_gb
        return ImageCache(
            parts.docker,
            parts.store,
            parts.blocking,
            busy=images.busy,
            keep=s.prepull,
            thresholds=Thresholds(
                min_free_bytes=int(s.image_gc_free_gb * GIB),
                max_cache_bytes=None if cache_gb is None else int(cache_gb * GIB),
            ),
            free_bytes=disk_free_bytes,
            on_removed=parts.metrics.image_removed,
        )

    def _start_image_loops(self, supervisor: Supervisor, services: _Services) -> None:
        s = self.settings
        images, cache = services.images, services.image_cache
        supervisor.start("image-gc", lambda: image_gc_loop(cache, s.image_gc_interval_s))
        if s.prepull:

            async def prepull(ref: str) -> None:
                await images.ensure(ref, None)

            supervisor.start(
                "prepull",
                lambda: prepull_loop(s.prepull, prepull, images.renters_idle, s.prepull_interval_s),
            )

    def _capacity(self, parts: _Parts, volumes: VolumeService) -> HostCapacity:
        s = self.settings

        def disk() -> Disk:
            try:
                root = parts.docker.data_root()
            except AgentError:
                root = FALLBACK_DOCKER_ROOT
            usage = disk_usage_bytes(root)
            return Disk(*usage) if usage else Disk(None, None)

        return HostCapacity(
            topology=lambda strict: parts.nvml.topology_async(strict=strict),
            shape=host_shape,
            disk=disk,
            reserved_disk=volumes.promised_sync,
            blocking=parts.blocking,
            max_instances=s.max_instances,
            reserved_cpu_cores=s.reserved_cpu_cores,
            reserved_memory_bytes=int(s.reserved_memory_gb * 1024**3),
            default_storage_bytes=None
            if s.default_storage_gb is None
            else int(s.default_storage_gb * 1024**3),
        )

    def _reporter(
        self, parts: _Parts, records: Records, cp: ControlPlane, meter: NetMeter
    ) -> StatsReporter:
        telemetry = Telemetry(
            instances=records.all,
            engine=parts.docker,
            cgroups=CgroupReader(),
            host=HostCounters(),
            gpu_samples=parts.nvml.samples_async,
            host_gpus=parts.nvml.uuids_async,
            size=HostSize(cpus=os.cpu_count() or 1, memory_bytes=host_memory_bytes()),
            blocking=parts.blocking,
            max_instances=self.settings.max_instances,
            network=meter,
        )
        parts.metrics.follow_stats(telemetry)
        return StatsReporter(telemetry.sample, cp.stats, (ControlPlaneError,))

    def _start_loops(
        self,
        supervisor: Supervisor,
        parts: _Parts,
        services: _Services,
        cp: ControlPlane | None,
        listening: asyncio.Future[int],
        tls: TlsKeeper | None,
    ) -> None:
        s = self.settings
        reconciler = services.reconciler
        supervisor.start(
            "reconcile",
            lambda: reconcile_loop(reconciler, services.net, s.sync_interval_s),
        )
        supervisor.start(
            "docker-events",
            lambda: docker_events_loop(
                parts.docker,
                parts.agent_id,
                reconciler.on_container_event,
                reconciler.sync,
                parts.blocking,
            ),
        )

        async def storage_pass() -> None:
            await services.storage.check(await services.records.all())

        supervisor.start(
            "storage",
            lambda: run_every(s.storage_check_interval_s, storage_pass, "storage", first_delay_s=0),
        )
        supervisor.start(
            "isolation",
            lambda: run_every(
                s.inventory_interval_s,
                lambda: _refreshed(services.isolation),
                "isolation",
                first_delay_s=0,
            ),
        )
        parts.metrics.follow_health(parts.health)
        supervisor.start("net-meter", services.meter.run)
        supervisor.start("gpu-events", lambda: gpu_events_loop(parts.nvml, parts.health))
        if cp is not None:
            reporter = self._reporter(parts, services.records, cp, services.meter)
            services.records.on_change(reporter.poke)

            async def control_plane() -> None:
                # Stats and inventory checks go out only once the control plane knows this agent.
                address = await self._address(parts)
                if tls is not None:  # the public address among the certificate's names
                    await parts.blocking.quick(tls.renew, address)
                registrar = self._registrar(parts, cp, address, tls)
                backoff = Backoff(base_s=0.5, cap_s=s.cp_backoff_max_s)
                await registration_loop(registrar, listening, backoff, (ControlPlaneError,))
                await self._tunnel_from_answer(parts, registrar, await listening, tls)
                async with asyncio.TaskGroup() as group:
                    group.create_task(reporter.run())
                    group.create_task(
                        inventory_loop(registrar.refresh_inventory, s.inventory_interval_s)
                    )

            supervisor.start("control-plane", control_plane)

    async def _start_tunnel(self, parts: _Parts, supervisor: Supervisor) -> None:
        """Tunnel mode: the key, the tunnel (when the settings hold it all), its checks."""
        s = self.settings
        if not s.tunnel:
            return
        routing = Routing(s.tunnel_interface, s.tunnel_table, s.tunnel_mark)
        key = s.state_dir / TUNNEL_KEY_FILE
        public_key = await asyncio.to_thread(ensure_key, key)
        parts.tunnel = tunnel = Tunnel(WireGuard(routing, key), parts.blocking, public_key)
        parts.metrics.follow_tunnel(tunnel.view)
        try:
            config = build(_tunnel_fields(s), {})
        except TunnelConfigError as e:
            if parts.api_key is None:
                log.error("tunnel mode is off: settings incomplete", extra={"error": str(e)})
            else:
                log.info("tunnel settings incomplete; waiting for /init", extra={"missing": str(e)})
        else:
            await tunnel.start(config)
        supervisor.start(
            "tunnel", lambda: run_every(TUNNEL_CHECK_S, tunnel.check, "tunnel", first_delay_s=1)
        )

    async def _tunnel_from_answer(
        self, parts: _Parts, registrar: Registrar, port: int, tls: TlsKeeper | None
    ) -> None:
        """The tunnel from /init's data.tunnel where the settings lacked it, then re-register."""
        tunnel = parts.tunnel
        if tunnel is None or tunnel.config is not None:
            return
        offer = registrar.tunnel_offer
        try:
            config = build(_tunnel_fields(self.settings), offer)
        except TunnelConfigError as e:
            log.error("tunnel mode is off: no complete tunnel settings", extra={"error": str(e)})
            return
        problem = block_problem(offer.get("ports"), self.settings.port_range)
        if problem:
            log.error("tunnel mode is off", extra={"error": problem})
            return
        await tunnel.start(config)  # on failure the checks keep trying: the address moves now
        if tls is not None:  # the relay's address among the certificate's names
            await parts.blocking.quick(tls.renew, config.public_address)
        registrar.move(config.public_address)
        await registrar.register(port)

    def _tls(self) -> TlsKeeper | None:
        """The port's certificate (the provider's, else the agent's own) and SSL context."""
        s = self.settings
        if s.tls is TlsMode.OFF:
            return None
        own = (s.tls_cert_file, s.tls_key_file) if s.tls_cert_file and s.tls_key_file else None
        names = certificate_names(socket.gethostname(), s.address, default_route_address())
        tls = TlsKeeper(s.state_dir, names, own, s.tls_client_ca)
        log.info(
            "TLS on the agent's port",
            extra={
                "mode": s.tls.value,
                "tls_pubkey_sha256": tls.identity.pin,
                "not_after": tls.identity.not_after.isoformat(),
                "agent_made": tls.identity.agent_made,
                "mutual": s.tls_client_ca is not None,
            },
        )
        return tls

    def _port_policy(self, tls: TlsKeeper | None) -> PortPolicy:
        s = self.settings
        raise_open_files_limit(s.http_max_connections)
        return PortPolicy(
            mode=s.tls,
            context=tls.context if tls else None,
            client_ca=s.tls_client_ca is not None,
            header_timeout_s=s.http_header_timeout_s,
            max_connections=s.http_max_connections,
        )

    async def _serve(self, parts: _Parts) -> int:
        s = self.settings
        if parts.api_key is None:
            await asyncio.to_thread(self._announce_standalone, parts)
        try:
            tls = await asyncio.to_thread(self._tls)
        except (TlsError, OSError) as e:
            log.error("cannot set up TLS on the agent's port", extra={"error": str(e)})
            return 1
        try:
            sock = await asyncio.to_thread(self._listen, parts)
        except PortUnavailable as e:
            log.error("cannot listen", extra={"error": e.strerror})
            return 1
        port = int(sock.getsockname()[1])
        services = await self._services(parts, port)
        parts.metrics.follow_disk(services.storage.known_data_root, disk_free_bytes)
        parts.metrics.follow_volumes(services.volumes.views_now)
        supervisor = Supervisor(on_death=parts.metrics.loop_died)
        await self._start_tunnel(parts, supervisor)
        server = make_server(
            create_app(
                ApiDeps(
                    secret=parts.credentials.agent_secret,
                    max_body_bytes=s.max_body_bytes,
                    instances=services.instances,
                    ssh=services.ssh,
                    volumes=services.volumes,
                    metrics=parts.metrics,
                    tunnel=parts.tunnel.view if parts.tunnel else None,
                    tls_pin=tls.identity.pin if tls else None,
                )
            ),
            s.shutdown_timeout_s,
            self._port_policy(tls),
        )
        parts.metrics.follow_port(server.port_figures)
        self._server = server
        if self._stop.is_set():
            server.should_exit = True
        cp = (
            ControlPlane(
                s.api_url,
                parts.api_key,
                timeout_s=s.cp_timeout_s,
                user_agent=f"qudata-agent/{__version__}",
                on_failure=parts.metrics.control_plane_failed,
                on_success=parts.metrics.control_plane_succeeded,
            )
            if parts.api_key
            else None
        )
        listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._start_loops(supervisor, parts, services, cp, listening, tls)
        if tls is not None:
            keeper = tls

            async def renew_tls() -> None:
                await parts.blocking.quick(keeper.renew)

            supervisor.start(
                "tls-renewal", lambda: run_every(TLS_RENEWAL_CHECK_S, renew_tls, "tls-renewal")
            )
        self._start_image_loops(supervisor, services)
        if s.metrics_listen is not None:
            try:
                metrics_sock = await asyncio.to_thread(bind_socket, *s.metrics_listen)
            except OSError as e:
                log.error("metrics listener cannot listen", extra={"error": e.strerror})
            else:
                supervisor.start(
                    "metrics", lambda: metrics_listener(metrics_sock, parts.metrics.render)
                )
        notifier = Notifier(s.notify_socket)
        if s.watchdog_usec and notifier.enabled:
            interval = ping_interval_s(s.watchdog_usec)
            supervisor.start("watchdog", lambda: watchdog_loop(notifier.watchdog, interval))
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        try:
            if await wait_started(server, serving):
                listening.set_result(port)
                notifier.ready(f"listening on port {port}")
                log.info(
                    "agent listening",
                    extra={
                        "agent_id": parts.agent_id,
                        "host": s.agent_host,
                        "port": port,
                        "version": __version__,
                        "standalone": cp is None,
                    },
                )
            await serving
        except SystemExit as e:  # uvicorn exits on a failed startup
            log.error("HTTP server failed to start", extra={"code": e.code})
            return 1
        finally:
            notifier.stopping()
            listening.cancel()
            await supervisor.stop(s.shutdown_timeout_s)
            await services.instances.close()
            await services.ssh.close()
            await services.cpu_pool.close()
            if cp is not None:
                await cp.aclose()
            sock.close()
        log.info("agent stopped")
        return 0


def _tunnel_fields(s: Settings) -> dict[str, str | None]:
    return {
        "endpoint": s.tunnel_endpoint,
        "relay_key": s.tunnel_relay_key,
        "address": s.tunnel_address,
        "public_address": s.tunnel_public_address,
    }


async def _refreshed(isolation: Isolation) -> None:
    await isolation.refresh()


def run(settings: Settings) -> int:
    """Runs the agent in the current thread until SIGTERM/SIGINT; returns the exit code."""

    async def main() -> int:
        agent = Agent(settings)
        # Installed with signal.signal so uvicorn restores (and re-raises into) ours.
        signal.signal(signal.SIGTERM, agent.request_stop)
        signal.signal(signal.SIGINT, agent.request_stop)
        return await agent.run()

    return asyncio.run(main())
