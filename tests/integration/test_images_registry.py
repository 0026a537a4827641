"""The image service and the image GC against a real registry and the real dockerd.

The registries are Debian's `docker-registry` on loopback (tests/support/
registry.py): one with htpasswd authentication (private images), one open
(public images). Every image here is pushed by the test under the
registry's own 127.0.0.1:PORT name, and the agent's store is a fresh one, so
the GC only ever sees these images on the shared dockerd.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest

from qudata_agent.adapters.docker import DockerEngine
from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.adapters.host import disk_free_bytes
from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.domain.image_access import RegistryUnreachable
from qudata_agent.domain.image_gc import GIB, Thresholds
from qudata_agent.domain.registry_credentials import RegistryCredentials
from qudata_agent.errors import AgentError
from qudata_agent.services.image_cache import ImageCache
from qudata_agent.services.images import NOTE_PINNED, NOTE_UNREACHABLE, ImageService
from qudata_agent.services.pulls import ImageTooLarge, PullCoordinator
from support.registry import Registry

pytestmark = pytest.mark.docker


class CountingEngine(DockerEngine):
    """The real engine, counting pulls and registry checks."""

    def __init__(self) -> None:
        super().__init__()
        self.pulls: list[str] = []
        self.checks: list[str] = []

    def pull(self, ref: str, *args: Any, **kwargs: Any) -> None:
        self.pulls.append(ref)
        super().pull(ref, *args, **kwargs)

    def registry_digest(self, ref: str, auth: Any) -> str:
        self.checks.append(ref)
        return super().registry_digest(ref, auth)


@dataclass
class Parts:
    engine: CountingEngine
    store: Store
    blocking: Blocking
    images: ImageService
    removed: list[str] = field(default_factory=list)

    @property
    def ports(self) -> DockerPorts:
        """The engine as the services take it."""
        return DockerPorts(self.engine, self.blocking)

    def creds(self, registry: Registry, password: str | None = None) -> RegistryCredentials:
        c = registry.credentials(password)
        return RegistryCredentials(c["login"], c["password"], c["registry"])


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    engine = CountingEngine()
    store = Store.open(tmp_path / "agent.db")
    blocking = Blocking()
    ports = DockerPorts(engine, blocking)
    images = ImageService(ports, store, blocking, PullCoordinator(ports, blocking, 60))
    yield Parts(engine, store, blocking, images)
    engine.close()
    blocking.close()
    store.close()


@pytest.fixture
def sdk() -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(version="auto")
    yield client
    client.close()


def _name() -> str:
    return f"team/app-{uuid.uuid4().hex[:8]}"


async def test_a_private_image_needs_the_right_credentials_cached_or_not(
    parts: Parts, registry: Registry
) -> None:
    ref, digest = registry.push_new(_name())
    right, wrong = parts.creds(registry), parts.creds(registry, "wrong-password")
    # not cached: no credentials and wrong ones are refused by the pull itself
    for auth in (None, wrong):
        with pytest.raises(AgentError):
            await parts.images.ensure(ref, auth, None)
    check = await parts.images.ensure(ref, right, None)
    assert check.digest == digest and check.checked
    # cached now, layers on disk: still refused without the right credentials
    with pytest.raises(AgentError, match="is private"):
        await parts.images.ensure(ref, None, None)
    with pytest.raises(AgentError, match="refused access"):
        await parts.images.ensure(ref, wrong, None)
    pinned = f"{ref.rsplit(':', 1)[0]}@{digest}"
    with pytest.raises(AgentError):  # a digest reference is checked too when private
        await parts.images.ensure(pinned, None, None)
    pulls = len(parts.engine.pulls)
    again = await parts.images.ensure(ref, right, None)
    assert again.digest == digest and again.checked
    assert len(parts.engine.pulls) == pulls  # checked, not pulled again


async def test_two_concurrent_orders_with_different_credentials(
    parts: Parts, registry: Registry
) -> None:
    ref, digest = registry.push_new(_name())
    right, wrong = parts.creds(registry), parts.creds(registry, "wrong-password")
    results = await asyncio.gather(
        parts.images.ensure(ref, wrong, None),
        parts.images.ensure(ref, right, None),
        parts.images.ensure(ref, None, None),
        return_exceptions=True,
    )
    assert isinstance(results[0], AgentError), results
    assert not isinstance(results[1], BaseException) and results[1].digest == digest
    assert isinstance(results[2], AgentError), results
    for failure in (results[0], results[2]):
        assert registry.password not in str(failure)
    assert len(parts.engine.pulls) == 3  # one pull per set of credentials, none shared


async def test_unreachable_registry_private_refused_public_from_the_cache(
    parts: Parts, registry: Registry, open_registry: Registry
) -> None:
    private, _ = registry.push_new(_name())
    public, public_digest = open_registry.push_new(_name())
    await parts.images.ensure(private, parts.creds(registry), None)
    await parts.images.ensure(public, None, None)
    registry.pause()
    open_registry.pause()
    try:
        with pytest.raises(AgentError, match=r"private .* could not be confirmed"):
            await parts.images.ensure(private, parts.creds(registry), None)
        check = await parts.images.ensure(public, None, None)
        assert check.note == NOTE_UNREACHABLE and not check.checked
        assert check.digest == public_digest
    finally:
        registry.resume()
        open_registry.resume()


async def test_a_moved_tag_is_pulled_again_an_unchanged_one_is_not(
    parts: Parts, open_registry: Registry
) -> None:
    name = _name()
    ref, first = open_registry.push_new(name)
    assert (await parts.images.ensure(ref, None, None)).digest == first
    assert parts.engine.pulls == [ref]
    before = open_registry.manifest_requests(name), open_registry.blob_gets(name)
    unchanged = await parts.images.ensure(ref, None, None)
    assert unchanged.digest == first and unchanged.checked
    assert parts.engine.pulls == [ref]  # no pull
    after = open_registry.manifest_requests(name), open_registry.blob_gets(name)
    assert after[1] - before[1] <= 1  # at most the config: no layer was fetched
    print("registry requests for an unchanged tag:", after[0] - before[0], "manifest")

    _, second = open_registry.push_new(name)  # the same tag, a new image
    moved = await parts.images.ensure(ref, None, None)
    assert moved.digest == second != first
    assert parts.engine.pulls == [ref, ref]

    pinned = f"{ref.rsplit(':', 1)[0]}@{second}"
    checks, requests = len(parts.engine.checks), len(open_registry.requests())
    check = await parts.images.ensure(pinned, None, None)
    assert check.note == NOTE_PINNED and check.digest == second
    assert len(parts.engine.checks) == checks  # a digest is never checked again
    assert len(open_registry.requests()) == requests


async def test_gc_removes_unused_images_lru_first_and_keeps_the_protected(
    parts: Parts, open_registry: Registry, sdk: docker.DockerClient
) -> None:
    refs = {}
    for role in ("old", "newer", "used", "pulling", "prepull"):
        ref, _ = open_registry.push_new(_name())
        await parts.images.ensure(ref, None, None)
        refs[role] = ref
    now = 1_000_000.0
    for i, role in enumerate(("newer", "old")):  # "old" gets the earlier use
        image = parts.engine.local_image(refs[role])
        assert image is not None
        parts.store.cache_used(image.image_id, now - i * 1000)
    label = f"qudata-test-{uuid.uuid4().hex[:8]}"
    container = sdk.containers.create(refs["used"], ["true"], labels={"qudata.test": label})
    removed: list[str] = []
    try:
        free = disk_free_bytes(parts.engine.data_root())
        assert free is not None
        cache = ImageCache(
            parts.ports,
            parts.store,
            parts.blocking,
            busy=lambda: frozenset({refs["pulling"]}),
            keep=(refs["prepull"],),
            thresholds=Thresholds(min_free_bytes=free + 1000 * GIB),  # always short of space
            free_bytes=disk_free_bytes,
            on_removed=removed.append,
        )
        done = await cache.collect()
        assert [r.image.refs for r in done] == [(refs["old"],), (refs["newer"],)]
        assert removed == ["free_space", "free_space"]
        for role in ("old", "newer"):
            assert parts.engine.local_image(refs[role]) is None
        for role in ("used", "pulling", "prepull"):
            assert parts.engine.local_image(refs[role]) is not None, role
        assert parts.engine.local_image("qudata-test/busybox:1") is not None
        assert await cache.collect() == []  # nothing else is the agent's to remove
    finally:
        container.remove(force=True)


async def test_gc_removes_the_old_image_of_a_moved_prepull_tag(
    parts: Parts, open_registry: Registry
) -> None:
    name = _name()
    ref, _ = open_registry.push_new(name)
    await parts.images.ensure(ref, None, None)
    old = parts.engine.local_image(ref)
    open_registry.push_new(name)  # the tag moves
    await parts.images.ensure(ref, None, None)
    new = parts.engine.local_image(ref)
    assert old is not None and new is not None and old.image_id != new.image_id
    free = disk_free_bytes(parts.engine.data_root())
    assert free is not None
    cache = ImageCache(
        parts.ports,
        parts.store,
        parts.blocking,
        busy=frozenset,
        keep=(ref,),
        thresholds=Thresholds(min_free_bytes=free + 1000 * GIB),
        free_bytes=disk_free_bytes,
    )
    done = await cache.collect()
    assert [r.image.image_id for r in done] == [old.image_id]
    assert parts.engine.local_image(old.image_id) is None
    assert parts.engine.local_image(ref) == new


def test_a_silent_registry_counts_as_unreachable_within_the_check_timeout() -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        engine = DockerEngine(check_timeout_s=1)
        try:
            started = time.monotonic()
            with pytest.raises(RegistryUnreachable):
                engine.registry_digest(f"127.0.0.1:{port}/team/app:1", None)
            assert time.monotonic() - started < 10
            assert engine.info()  # the engine itself still answers
        finally:
            engine.close()


async def test_an_image_larger_than_the_free_disk_fails_early_and_is_not_kept(
    parts: Parts, open_registry: Registry
) -> None:
    """The real pull from a real registry; only the free space it is weighed against is small."""
    ref, _ = open_registry.push_new(_name(), extra_bytes=3 * 1024**2)  # random: 3 MiB compressed
    pulls = PullCoordinator(parts.ports, parts.blocking, 60, free_bytes=lambda: 1024**2)
    images = ImageService(parts.ports, parts.store, parts.blocking, pulls)
    with pytest.raises(ImageTooLarge, match="does not fit") as caught:
        await images.ensure(ref, None)
    assert "has 1.0 MiB free" in caught.value.message
    assert parts.engine.local_image(ref) is None
    # with the disk's real free space the same pull goes through
    await ImageService(
        parts.ports,
        parts.store,
        parts.blocking,
        PullCoordinator(parts.ports, parts.blocking, 60, free_bytes=lambda: 1000 * GIB),
    ).ensure(ref, None)
    assert parts.engine.local_image(ref) is not None
