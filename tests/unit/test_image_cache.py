"""The image cache's collector: what it removes when space runs low, and what it never does.

What the agent cached is a real store's; Docker's images and the containers
using them are a small fake of `CacheEngine`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from qudata_agent.domain.image_access import LocalImage
from qudata_agent.domain.image_gc import Thresholds
from qudata_agent.errors import Conflict
from qudata_agent.services.image_cache import ImageCache
from qudata_agent.services.instance_events import InstanceEvents
from support.services import GIB, Base, base_on, make_image_cache, record, spec_of

LOW = Thresholds(min_free_bytes=10 * GIB)  # with FREE below it: space runs low
FREE = 7 * GIB


@dataclass
class CacheEngine:
    """Docker's images by id; removal refuses an image a container uses."""

    images: dict[str, LocalImage] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)  # ids of images containers use
    taken_meanwhile: set[str] = field(default_factory=set)  # a container takes it during a pass
    gate: threading.Event = field(default_factory=threading.Event)
    listing: int = 0
    most_listing: int = 0

    def __post_init__(self) -> None:
        self.gate.set()

    def add(self, image_id: str, *tags: str, size: int = 5 * GIB) -> None:
        self.images[image_id] = LocalImage(image_id, tags=tags, size=size)

    def local_images(self) -> list[LocalImage]:
        self.listing += 1
        self.most_listing = max(self.most_listing, self.listing)
        self.gate.wait(10)
        self.listing -= 1
        return list(self.images.values())

    def local_image(self, ref: str) -> LocalImage | None:
        for image in self.images.values():
            if ref == image.image_id or ref in image.tags:
                return image
        return None

    def container_image_ids(self) -> frozenset[str]:
        return frozenset(self.used)

    def remove_image(self, ref: str) -> bool:
        image = self.local_image(ref)
        if image is None:
            return False
        if ref in image.tags and len(image.tags) > 1:
            self.images[image.image_id] = replace(
                image, tags=tuple(t for t in image.tags if t != ref)
            )
            return True
        if image.image_id in self.used | self.taken_meanwhile:
            raise Conflict(f"image {image.image_id} is used by a container")
        del self.images[image.image_id]
        return True

    def data_root(self) -> str:
        return "/var/lib/docker"


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Base]:
    with base_on(tmp_path) as made:
        yield made


def cached(base: Base, engine: CacheEngine, image_id: str, ref: str, last_used: float) -> None:
    """An image the agent pulled (`ref`), as Docker and the store know it."""
    engine.add(image_id, ref)
    base.store.cache_pulled(image_id, ref, last_used)


def cached_ids(base: Base) -> list[str]:
    return [image_id for image_id, _refs, _at in base.store.cached_images()]


def three_cached(base: Base, engine: CacheEngine) -> None:
    cached(base, engine, "id-old", "old:1", 1.0)
    cached(base, engine, "id-mid", "mid:1", 2.0)
    cached(base, engine, "id-new", "new:1", 3.0)


async def test_with_both_thresholds_met_nothing_is_removed(base: Base) -> None:
    engine = CacheEngine()
    three_cached(base, engine)
    cache = make_image_cache(base, engine, thresholds=LOW, free_bytes=10 * GIB)
    assert await cache.collect() == []
    assert set(engine.images) == {"id-old", "id-mid", "id-new"}
    assert cached_ids(base) == ["id-mid", "id-new", "id-old"]


async def test_low_space_removes_the_least_recently_used_until_enough_is_free(
    base: Base,
) -> None:
    engine = CacheEngine()
    three_cached(base, engine)
    counted: list[str] = []
    cache = make_image_cache(
        base, engine, thresholds=LOW, free_bytes=FREE, on_removed=counted.append
    )
    removed = await cache.collect()
    assert [(r.image.image_id, r.reason) for r in removed] == [("id-old", "free_space")]
    assert set(engine.images) == {"id-mid", "id-new"}
    assert cached_ids(base) == ["id-mid", "id-new"]
    assert counted == ["free_space"]


async def test_a_cache_over_its_size_cap_is_cut_back_to_it(base: Base) -> None:
    engine = CacheEngine()
    three_cached(base, engine)
    counted: list[str] = []
    capped = Thresholds(min_free_bytes=0, max_cache_bytes=6 * GIB)
    cache = make_image_cache(
        base, engine, thresholds=capped, free_bytes=100 * GIB, on_removed=counted.append
    )
    removed = await cache.collect()
    assert [r.image.image_id for r in removed] == ["id-old", "id-mid"]
    assert set(engine.images) == {"id-new"}
    assert counted == ["cache_size", "cache_size"]


async def test_a_busy_image_is_never_removed_however_low_the_space(base: Base) -> None:
    engine = CacheEngine()
    cached(base, engine, "id-run", "run:1", 1.0)
    engine.used.add("id-run")  # a container (stopped or running, anyone's) uses it
    cached(base, engine, "id-named", "named:1", 1.0)
    record(base, "a", spec=spec_of("a", image="docker.io/library/named:1"))  # a build in flight
    cached(base, engine, "id-pulling", "pulling:1", 1.0)
    cached(base, engine, "id-kept", "kept:1", 1.0)
    cached(base, engine, "id-free", "free:1", 2.0)
    cache = make_image_cache(
        base,
        engine,
        thresholds=Thresholds(min_free_bytes=1000 * GIB),
        free_bytes=0,
        busy=frozenset({"pulling:1"}),
        keep=("docker.io/library/kept:1",),  # the pre-pull list, as the provider wrote it
    )
    removed = await cache.collect()
    assert [r.image.image_id for r in removed] == ["id-free"]
    assert set(engine.images) == {"id-run", "id-named", "id-pulling", "id-kept"}


async def test_an_image_someone_else_tagged_too_is_only_untagged(base: Base) -> None:
    engine = CacheEngine()
    cached(base, engine, "id-shared", "mine:1", 1.0)
    engine.add("id-shared", "mine:1", "theirs:1")
    counted: list[str] = []
    cache = make_image_cache(
        base, engine, thresholds=LOW, free_bytes=FREE, on_removed=counted.append
    )
    assert await cache.collect() == []
    assert engine.images["id-shared"].tags == ("theirs:1",)
    assert cached_ids(base) == []  # no longer the agent's
    assert counted == []


async def test_an_image_a_container_took_meanwhile_is_kept_and_still_cached(base: Base) -> None:
    engine = CacheEngine()
    cached(base, engine, "id-taken", "taken:1", 1.0)
    engine.taken_meanwhile.add("id-taken")
    counted: list[str] = []
    cache = make_image_cache(
        base, engine, thresholds=LOW, free_bytes=FREE, on_removed=counted.append
    )
    assert await cache.collect() == []
    assert "id-taken" in engine.images
    assert cached_ids(base) == ["id-taken"]
    assert counted == []


async def test_an_image_removed_outside_the_agent_is_forgotten(base: Base) -> None:
    engine = CacheEngine()
    base.store.cache_pulled("id-gone", "gone:1", 1.0)
    cache = make_image_cache(base, engine, thresholds=LOW, free_bytes=FREE)
    assert await cache.collect() == []
    assert cached_ids(base) == []


async def test_a_pull_of_a_moved_tag_does_not_protect_the_image_it_left(base: Base) -> None:
    engine = CacheEngine()
    base.store.cache_pulled("id-before", "app:1", 1.0)
    engine.add("id-before")  # the tag moved to the image being pulled now
    cache = make_image_cache(
        base, engine, thresholds=LOW, free_bytes=FREE, busy=frozenset({"app:1"})
    )
    removed = await cache.collect()
    assert [r.image.image_id for r in removed] == ["id-before"]
    assert engine.images == {}


async def test_passes_never_overlap(base: Base) -> None:
    engine = CacheEngine()
    three_cached(base, engine)
    engine.gate.clear()
    cache = make_image_cache(base, engine, thresholds=LOW, free_bytes=FREE)
    both = asyncio.gather(cache.collect(), cache.collect())
    await asyncio.sleep(0.05)
    engine.gate.set()
    first, second = await asyncio.wait_for(both, 5)
    assert engine.most_listing == 1
    assert [r.image.image_id for r in first] == ["id-old"]
    assert [r.image.image_id for r in second] == ["id-mid"]  # the second saw the first's work


async def test_a_poke_wakes_the_waiting_loop(base: Base) -> None:
    cache: ImageCache = make_image_cache(base, CacheEngine(), thresholds=LOW, free_bytes=FREE)
    started = time.monotonic()
    await cache.wait_poke(0.05)  # nobody poked: the full wait
    assert time.monotonic() - started >= 0.04
    waiter = asyncio.ensure_future(cache.wait_poke(10))
    await asyncio.sleep(0.01)
    cache.poke()
    await asyncio.wait_for(waiter, 1)
    started = time.monotonic()
    await cache.wait_poke(0.05)  # the poke was used up
    assert time.monotonic() - started >= 0.04


async def test_a_new_run_or_a_removal_asks_for_a_pass_and_other_changes_do_not(
    base: Base,
) -> None:
    events = InstanceEvents()
    cache = make_image_cache(base, CacheEngine(), thresholds=LOW, free_bytes=FREE, events=events)
    events.changed()  # a create, a stop, a start: no image became unused
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(cache.wait_poke(60), 0.2)
    events.removed(record(base, "gone"))
    await asyncio.wait_for(cache.wait_poke(60), 5)  # poked: at once
    events.new_run(record(base, "started"))
    await asyncio.wait_for(cache.wait_poke(60), 5)
