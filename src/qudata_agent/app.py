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
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from qudata_agent import __version__
from qudata_agent.acceptor import PortPolicy, raise_open_files_limit
from qudata_agent.adapters.cgroups import CgroupReader
from qudata_agent.adapters.control_plane import ControlPlane, ControlPlaneError
from qudata_agent.adapters.docker import DockerEngine
from qudata_agent.adapters.docker.ports import DockerPorts
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
from qudata_agent.adapters.ssh_bundle import SshBundle
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
from qudata_agent.domain.tls import TlsMode, certificate_names
from qudata_agent.domain.tunnel import Routing
from qudata_agent.domain.volumes import Mechanism, choose_mechanism
from qudata_agent.errors import AgentError
from qudata_agent.loops.control_plane import ControlPlaneSteps, control_plane_loop
from qudata_agent.loops.docker_events import docker_events_loop
from qudata_agent.loops.gpu_events import gpu_events_loop
from qudata_agent.loops.images import image_gc_loop, prepull_loop
from qudata_agent.loops.metrics_listener import metrics_listener
from qudata_agent.loops.periodic import run_every
from qudata_agent.loops.reconcile import reconcile_loop
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
from qudata_agent.services.credentials import Credentials
from qudata_agent.services.host_facts import (
    DockerDisk,
    cdi_gpus,
    inventory,
    port_gate,
    public_address,
    ssh_bundle,
)
from qudata_agent.services.isolation import Isolation
from qudata_agent.services.registration import Identity, Registrar
from qudata_agent.services.registry_guard import RegistryGuard
from qudata_agent.services.telemetry import HostSize, Telemetry
from qudata_agent.services.tunnel import Tunnel
from qudata_agent.services.volumes import Backing
from qudata_agent.state_dir import (
    AGENT_SECRET_FILE,
    API_KEY_FILE,
    DB_FILE,
    METER_FILE,
    TUNNEL_KEY_FILE,
    Meta,
    StateDir,
)
from qudata_agent.wall import egress_policy, wall_plan
from qudata_agent.wiring import (
    HostReads,
    InstanceSide,
    IsolationParts,
    MeterParts,
    NetworkParts,
    Outside,
    SshParts,
    StorageReads,
    VolumeParts,
    instance_side,
)

log = logging.getLogger(__name__)

AGENT_ID_KEY = Meta.AGENT_ID
AGENT_PORT_KEY = Meta.AGENT_PORT
TUNNEL_CHECK_S = 5.0
TLS_RENEWAL_CHECK_S = 6 * 3600.0


@dataclass
class _Parts:
    """The adapters opened from the state directory, closed by `Agent.run`."""

    store: Store
    credentials: Credentials
    blocking: Blocking
    docker: DockerEngine  # blocking: for reads that already run in a worker thread
    engine: DockerPorts  # the same engine as the services take it: async, each call its pool
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
    blocking = Blocking()
    docker = DockerEngine(settings.docker_host)
    return _Parts(
        store=store,
        credentials=credentials,
        blocking=blocking,
        docker=docker,
        engine=DockerPorts(docker, blocking),
        nvml=Nvml(),
        agent_id=store.get_or_create(AGENT_ID_KEY, lambda: str(uuid.uuid4())),
        api_key=credentials.api_key(settings.api_key),
    )


async def _outside(parts: _Parts, s: Settings, agent_port: int) -> Outside:
    """The real adapters of the instance side, as `wiring.instance_side` takes them."""
    blocking, docker, nvml = parts.blocking, parts.docker, parts.nvml
    docker_disk = DockerDisk(docker.data_root, disk_usage_bytes, disk_free_bytes)
    ssh_root = StateDir(s.state_dir).ssh_dir
    gate = IptablesPortGate(parts.agent_id, s.port_range) if s.firewall else None
    reserved = {agent_port} | ({s.metrics_listen[1]} if s.metrics_listen else set())

    async def driver() -> tuple[int, str | None]:
        report = await nvml.report_async()
        return len(report.gpus), report.driver_version

    return Outside(
        engine=parts.engine,
        store=parts.store,
        blocking=blocking,
        agent_id=parts.agent_id,
        host=HostReads(
            topology=lambda strict: nvml.topology_async(strict=strict),
            shape=host_shape,
            disk=docker_disk.disk,
            docker_free_bytes=docker_disk.free_now,
            free_bytes=disk_free_bytes,
            port_free=port_is_free,
            gpu_health=lambda i: parts.health.problems(i.gpus, since=i.created_at),
            disable_ipv6=ipv6_available(),
            cdi_gpus=await cdi_gpus(parts.engine, nvml.uuids_async, cdi_spec_texts, blocking),
        ),
        storage=StorageReads(
            mount_options, docker.storage_info, lambda path: tree_bytes(path).bytes
        ),
        ssh=SshParts(
            files=InstanceSshFiles(ssh_root / "instances"),
            bundle=await ssh_bundle(SshBundle(ssh_root / "bundles").ensure, blocking),
            probe=HostSshProbe(),
            gate=gate if await port_gate(gate, blocking) else None,
        ),
        network=NetworkParts(Firewall() if s.firewall else None, wall_plan(s)),
        meter=MeterParts(
            Nftables(s.bridge),
            TrafficControl(),
            MeterFile(s.state_dir / METER_FILE),
            egress_policy(s),
        ),
        volumes=_volume_parts(s),
        isolation=IsolationParts(RuntimeTools(), driver),
        registry=RegistryGuard(
            allow=s.registry_allow,
            resolve=resolve,
            own_addresses=own_addresses,
            public_address=s.address,
        ),
        reserved_ports=frozenset(reserved),
        on_reconcile=parts.metrics.reconcile_ran,
        on_image_removed=parts.metrics.image_removed,
    )


def _volume_parts(s: Settings) -> VolumeParts:
    """Volumes under the state directory, sized the way this host's filesystem allows."""
    root = StateDir(s.state_dir).volumes_dir
    ensure_private_dir(root)
    found = fs_facts(root)
    mechanism, why = choose_mechanism(None if found is None else found[0])
    backings: dict[Mechanism, Backing] = {Mechanism.LOOP: LoopVolumes(root)}
    if found is not None:
        backings[Mechanism.XFS_PROJECT] = XfsProjectVolumes(root, found[1])
    log.info("volumes", extra={"mechanism": mechanism.value, "why": why, "root": str(root)})
    return VolumeParts(backings, mechanism, lambda: disk_free_bytes(str(root)), copy_tree)


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = asyncio.Event()
        self._server: Any = None

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None and not self._stop.is_set():
            log.info("stop requested", extra={"signal": signal.Signals(signum).name})
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True

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

    async def _serve(self, parts: _Parts) -> int:
        """The agent from its port to its stop, in order: port, services, loops, HTTP."""
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
        side = instance_side(await _outside(parts, s, port), s)
        assert side.storage and side.volumes and side.net and side.meter and side.ssh  # all on
        side.ssh.prune_soon()
        self._follow(parts, side)
        supervisor = Supervisor(on_death=parts.metrics.loop_died)
        await self._start_tunnel(parts, supervisor)
        app = create_app(self._api_deps(parts, side, tls))
        server = self._server = make_server(app, s.shutdown_timeout_s, self._port_policy(tls))
        parts.metrics.follow_port(server.port_figures)
        if self._stop.is_set():
            server.should_exit = True
        cp = self._control_plane(parts)
        listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._start_loops(supervisor, parts, side, tls)
        if cp is not None:
            supervisor.start("control-plane", self._cp_loop(parts, side, cp, tls, listening))
        self._start_image_loops(supervisor, side)
        await self._start_metrics_listener(supervisor, parts)
        notifier = Notifier(s.notify_socket)
        if s.watchdog_usec and notifier.enabled:
            interval = ping_interval_s(s.watchdog_usec)
            supervisor.start("watchdog", lambda: watchdog_loop(notifier.watchdog, interval))
        try:
            return await self._serve_http(parts, server, sock, listening, notifier, cp is None)
        finally:
            notifier.stopping()
            listening.cancel()
            await supervisor.stop(s.shutdown_timeout_s)
            await side.close()
            if cp is not None:
                await cp.aclose()
            sock.close()

    async def _serve_http(
        self,
        parts: _Parts,
        server: Any,
        sock: socket.socket,
        listening: asyncio.Future[int],
        notifier: Notifier,
        standalone: bool,
    ) -> int:
        port = int(sock.getsockname()[1])
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        try:
            if await wait_started(server, serving):
                listening.set_result(port)
                notifier.ready(f"listening on port {port}")
                log.info(
                    "agent listening",
                    extra={
                        "agent_id": parts.agent_id,
                        "host": self.settings.agent_host,
                        "port": port,
                        "version": __version__,
                        "standalone": standalone,
                    },
                )
            await serving
        except SystemExit as e:  # uvicorn exits on a failed startup
            log.error("HTTP server failed to start", extra={"code": e.code})
            return 1
        log.info("agent stopped")
        return 0

    def _announce_standalone(self, parts: _Parts) -> None:
        parts.credentials.ensure_secret()
        path = parts.credentials.secret_path
        log.info("standalone mode: no API key, no control-plane calls; agent secret in %s", path)
        print(
            f"qudata-agent: standalone mode; agent secret file: {path}", file=sys.stderr, flush=True
        )

    def _listen(self, parts: _Parts) -> socket.socket:
        """The agent's port: the configured one, else the one it had last time, else a free one."""
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

    def _follow(self, parts: _Parts, side: InstanceSide) -> None:
        """The metrics read the parts they report on."""
        assert side.storage and side.volumes and side.meter
        metrics = parts.metrics
        metrics.follow_network(side.meter)
        metrics.follow_disk(side.storage.known_data_root, disk_free_bytes)
        metrics.follow_volumes(side.volumes.views_now)
        metrics.follow_health(parts.health)

    def _api_deps(self, parts: _Parts, side: InstanceSide, tls: TlsKeeper | None) -> ApiDeps:
        assert side.ssh and side.volumes
        return ApiDeps(
            secret=parts.credentials.agent_secret,
            max_body_bytes=self.settings.max_body_bytes,
            instances=side.instances,
            ssh=side.ssh,
            volumes=side.volumes,
            metrics=parts.metrics,
            tunnel=parts.tunnel.view if parts.tunnel else None,
            tls_pin=tls.identity.pin if tls else None,
        )

    def _control_plane(self, parts: _Parts) -> ControlPlane | None:
        """The control-plane client; None in standalone mode (no API key)."""
        if not parts.api_key:
            return None
        return ControlPlane(
            self.settings.api_url,
            parts.api_key,
            timeout_s=self.settings.cp_timeout_s,
            user_agent=f"qudata-agent/{__version__}",
            on_failure=parts.metrics.control_plane_failed,
            on_success=parts.metrics.control_plane_succeeded,
        )

    def _start_loops(
        self, supervisor: Supervisor, parts: _Parts, side: InstanceSide, tls: TlsKeeper | None
    ) -> None:
        s = self.settings
        reconciler, storage, isolation = side.reconciler, side.storage, side.isolation
        net, meter = side.net, side.meter
        assert net and storage and isolation and meter
        supervisor.start("reconcile", lambda: reconcile_loop(reconciler, net, s.sync_interval_s))
        supervisor.start(
            "docker-events",
            lambda: docker_events_loop(
                parts.engine, parts.agent_id, reconciler.on_container_event, reconciler.sync
            ),
        )
        supervisor.start(
            "storage",
            lambda: run_every(
                s.storage_check_interval_s,
                lambda: storage.check_all(side.records.all),
                "storage",
                first_delay_s=0,
            ),
        )
        supervisor.start(
            "isolation",
            lambda: run_every(
                s.inventory_interval_s, _refreshed(isolation), "isolation", first_delay_s=0
            ),
        )
        supervisor.start("net-meter", meter.run)
        supervisor.start("gpu-events", lambda: gpu_events_loop(parts.nvml, parts.health))
        if tls is not None:
            keeper = tls

            async def renew_tls() -> None:
                await parts.blocking.quick(keeper.renew)

            supervisor.start(
                "tls-renewal", lambda: run_every(TLS_RENEWAL_CHECK_S, renew_tls, "tls-renewal")
            )

    def _cp_loop(
        self,
        parts: _Parts,
        side: InstanceSide,
        cp: ControlPlane,
        tls: TlsKeeper | None,
        listening: asyncio.Future[int],
    ) -> Callable[[], Coroutine[Any, Any, None]]:
        """The control-plane sequence (`loops.control_plane`) with this agent's parts."""
        s = self.settings
        reporter = self._reporter(parts, side, cp)

        async def renew_tls(address: str | None) -> None:
            if tls is not None:  # the address among the certificate's names
                await parts.blocking.quick(tls.renew, address)

        async def address() -> str | None:
            relay = parts.tunnel.config if parts.tunnel else None
            lookups = PublicAddress(s.address_lookup_urls, user_agent=f"qudata-agent/{__version__}")
            return await public_address(
                relay.public_address if relay else None,
                s.address,
                lookups.lookup,
                default_route_address,
                parts.blocking,
            )

        steps = ControlPlaneSteps(
            address=address,
            registrar=lambda a: self._registrar(parts, side, cp, a, tls),
            renew_tls=renew_tls,
            backoff=Backoff(base_s=0.5, cap_s=s.cp_backoff_max_s),
            retry_on=(ControlPlaneError,),
            report_stats=reporter.run,
            inventory_interval_s=s.inventory_interval_s,
            tunnel=parts.tunnel,
            tunnel_fields=_tunnel_fields(s),
            port_range=s.port_range,
        )
        return lambda: control_plane_loop(steps, listening)

    def _registrar(
        self,
        parts: _Parts,
        side: InstanceSide,
        cp: ControlPlane,
        address: str | None,
        tls: TlsKeeper | None,
    ) -> Registrar:
        identity = Identity(
            agent_id=parts.agent_id,
            fingerprint=machine_fingerprint(),
            address=address,
            tunnel_pubkey=parts.tunnel.public_key if parts.tunnel else None,
            tls_pubkey_sha256=tls.identity.pin if tls else None,
        )
        probe = HostProbe(parts.nvml)

        async def host_inventory() -> dict[str, Any]:
            return await inventory(parts.engine, probe.inventory, side.isolation, parts.blocking)

        return Registrar(
            cp, parts.credentials, parts.store, identity, host_inventory, parts.blocking
        )

    def _reporter(self, parts: _Parts, side: InstanceSide, cp: ControlPlane) -> StatsReporter:
        telemetry = Telemetry(
            instances=side.records.all,
            engine=parts.engine,
            cgroups=CgroupReader(),
            host=HostCounters(),
            gpu_samples=parts.nvml.samples_async,
            host_gpus=parts.nvml.uuids_async,
            size=HostSize(cpus=os.cpu_count() or 1, memory_bytes=host_memory_bytes()),
            blocking=parts.blocking,
            max_instances=self.settings.max_instances,
            network=side.meter,
        )
        parts.metrics.follow_stats(telemetry)
        return StatsReporter(
            telemetry.sample,
            cp.stats,
            (ControlPlaneError,),
            events=side.events,
            sample_on_poke=telemetry.sample_on_change,
        )

    def _start_image_loops(self, supervisor: Supervisor, side: InstanceSide) -> None:
        s = self.settings
        images, cache = side.images, side.image_cache
        supervisor.start("image-gc", lambda: image_gc_loop(cache, s.image_gc_interval_s))
        if s.prepull:

            async def prepull(ref: str) -> None:
                await images.ensure(ref, None)

            supervisor.start(
                "prepull",
                lambda: prepull_loop(s.prepull, prepull, images.renters_idle, s.prepull_interval_s),
            )

    async def _start_metrics_listener(self, supervisor: Supervisor, parts: _Parts) -> None:
        if self.settings.metrics_listen is None:
            return
        try:
            sock = await asyncio.to_thread(bind_socket, *self.settings.metrics_listen)
        except OSError as e:
            log.error("metrics listener cannot listen", extra={"error": e.strerror})
            return
        supervisor.start("metrics", lambda: metrics_listener(sock, parts.metrics.render))

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
        await tunnel.start_from_settings(_tunnel_fields(s), standalone=parts.api_key is None)
        supervisor.start(
            "tunnel", lambda: run_every(TUNNEL_CHECK_S, tunnel.check, "tunnel", first_delay_s=1)
        )

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


def _tunnel_fields(s: Settings) -> dict[str, str | None]:
    return {
        "endpoint": s.tunnel_endpoint,
        "relay_key": s.tunnel_relay_key,
        "address": s.tunnel_address,
        "public_address": s.tunnel_public_address,
    }


def run(settings: Settings) -> int:
    """Runs the agent in the current thread until SIGTERM/SIGINT; returns the exit code."""

    async def main() -> int:
        agent = Agent(settings)
        # Installed with signal.signal so uvicorn restores (and re-raises into) ours.
        signal.signal(signal.SIGTERM, agent.request_stop)
        signal.signal(signal.SIGINT, agent.request_stop)
        return await agent.run()

    return asyncio.run(main())


def _refreshed(isolation: Isolation) -> Callable[[], Awaitable[None]]:
    async def refresh() -> None:
        await isolation.refresh()

    return refresh
