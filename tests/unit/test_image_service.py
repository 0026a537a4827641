"""The image service and the pre-pull loop with a small fake engine (the real registry
is covered in tests/integration/test_images_registry.py and tests/e2e/test_images.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.domain.image_access import LocalImage, RegistryRefused, RegistryUnreachable
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.registry_credentials import RegistryCredentials
from qudata_agent.errors import AgentError
from qudata_agent.loops.images import prepull_loop
from qudata_agent.services.images import NOTE_UNREACHABLE, ImageService
from qudata_agent.services.pulls import PullCoordinator

DIGEST = "sha256:" + "a" * 64
REF = "reg:5000/team/app:1"
RIGHT = RegistryCredentials("renter", "right-password", "reg:5000")


class FakeRegistryEngine:
    """One image in a registry that wants RIGHT; pulls wait for a gate."""

    def __init__(self) -> None:
        self.local: dict[str, LocalImage] = {}
        self.reachable = True
        self.gate = threading.Event()
        self.gate.set()
        self.pulls: list[str] = []
        self.checks: list[Any] = []

    def local_image(self, ref: str) -> LocalImage | None:
        return self.local.get(ref)

    def registry_digest(self, ref: str, auth: Any) -> str:
        self.checks.append(auth)
        if not self.reachable:
            raise RegistryUnreachable("down")
        if auth != RIGHT:
            raise RegistryRefused("the registry refused access")
        return DIGEST

    def image_present(self, ref: str) -> bool:
        return ref in self.local

    def pull(self, ref: str, auth: Any, on_progress: Any, inactivity_s: float) -> None:
        self.pulls.append(ref)
        self.gate.wait(10)
        if ref.startswith("reg:5000/") and auth != RIGHT:
            raise AgentError("pull refused")
        repo = ref.rsplit(":", 1)[0]
        self.local[ref] = LocalImage("id-" + ref, (ref,), (f"{repo}@{DIGEST}",), 10)


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[ImageService, FakeRegistryEngine, Store]]:
    engine = FakeRegistryEngine()
    store = Store.open(tmp_path / "agent.db")
    blocking = Blocking()
    ports = DockerPorts(engine, blocking)  # type: ignore[arg-type]
    service = ImageService(ports, store, blocking, PullCoordinator(ports, blocking, 5))
    yield service, engine, store
    engine.gate.set()
    blocking.close()
    store.close()


def _instance(store: Store, instance_id: str) -> None:
    store.insert_instance(
        Instance(
            id=instance_id,
            status=Status.PENDING,
            wanted=Wanted.RUNNING,
            image=REF,
            container_name=f"qudata-{instance_id}",
            created_at=1.0,
            updated_at=1.0,
        )
    )


async def test_a_resumed_build_keeps_the_image_it_was_granted(parts: Any) -> None:
    service, engine, store = parts
    _instance(store, "i1")
    first = await service.ensure(REF, RIGHT, "i1")
    assert first.checked and first.digest == DIGEST
    # After a restart the build has no credentials; its own grant still holds...
    again = await service.ensure(REF, None, "i1")
    assert again == first
    # ...but no other order's.
    _instance(store, "i2")
    engine.reachable = False
    with pytest.raises(AgentError, match="is private"):
        await service.ensure(REF, None, "i2")
    assert store.is_private("reg:5000/team/app", [DIGEST])
    assert "right-password" not in repr((await service.views(["i1"])).get("i1"))


async def test_a_public_image_runs_from_the_cache_when_the_registry_is_down(parts: Any) -> None:
    service, engine, _ = parts
    await service.ensure("pub:5000/x:1", None)
    engine.reachable = False
    check = await service.ensure("pub:5000/x:1", None)
    assert check.note == NOTE_UNREACHABLE and not check.checked
    assert engine.pulls == ["pub:5000/x:1"]


async def test_prepulls_wait_for_a_renter_pull_and_go_one_at_a_time(parts: Any) -> None:
    service, engine, store = parts
    engine.gate.clear()
    _instance(store, "i1")
    renter = asyncio.ensure_future(service.ensure(REF, RIGHT, "i1"))
    await asyncio.sleep(0.05)
    started: list[str] = []

    async def prepull(ref: str) -> None:
        started.append(ref)
        await service.ensure(ref, None)

    loop = asyncio.ensure_future(
        prepull_loop(("pub:5000/a:1", "pub:5000/b:1"), prepull, service.renters_idle, 3600)
    )
    await asyncio.sleep(0.1)
    assert started == []  # the renter's pull goes first
    engine.gate.set()
    await renter
    for _ in range(100):
        if len(engine.pulls) == 3:
            break
        await asyncio.sleep(0.02)
    assert engine.pulls == [REF, "pub:5000/a:1", "pub:5000/b:1"]
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop


async def test_another_spelling_of_a_private_image_is_still_private(parts: Any) -> None:
    service, engine, _ = parts
    await service.ensure(REF, RIGHT)
    pulled = engine.local[REF]
    # The same image under a name with no digest of its own (a local tag): found by ID.
    engine.local["alias:1"] = LocalImage(pulled.image_id, ("alias:1",), (), 10)
    with pytest.raises(AgentError, match="refused access"):
        await service.ensure("alias:1", None)


async def test_admission_refuses_a_forbidden_registry_unless_nothing_is_contacted(
    tmp_path: Path,
) -> None:
    from qudata_agent.domain.image_ref import resolve_image
    from qudata_agent.errors import InvalidRequest
    from qudata_agent.services.registry_guard import RegistryGuard

    asked: list[str] = []

    async def resolve(host: str, timeout_s: float) -> tuple[str, ...]:
        asked.append(host)
        return ("127.0.0.1",)

    engine = FakeRegistryEngine()
    store = Store.open(tmp_path / "agent.db")
    blocking = Blocking()
    guard = RegistryGuard(allow=(), resolve=resolve, own_addresses=frozenset)
    ports = DockerPorts(engine, blocking)  # type: ignore[arg-type]
    service = ImageService(ports, store, blocking, PullCoordinator(ports, blocking, 5), guard=guard)
    try:
        with pytest.raises(InvalidRequest, match="loopback"):
            await service.admit(resolve_image("localhost:5000/app:1", None))
        # the build's own path refuses it too, before any registry call or pull
        with pytest.raises(InvalidRequest):
            await service.ensure("localhost:5000/app:1", None, None)
        assert engine.checks == [] and engine.pulls == []
        # built or loaded here (no registry digest): used as it is, whatever its name says
        engine.local["localhost:5000/app:1"] = LocalImage("id-local", ("localhost:5000/app:1",))
        asked.clear()
        await service.admit(resolve_image("localhost:5000/app:1", None))
        check = await service.ensure("localhost:5000/app:1", None, None)
        assert not check.checked and asked == [] and engine.checks == []
    finally:
        blocking.close()
        store.close()
