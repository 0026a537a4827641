"""services.volumes over the real store and a fake backing: admission, restore, delete."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.volumes import GIB, BackingError, Mechanism, State, Volume
from qudata_agent.errors import Conflict, NotFound
from qudata_agent.services.volumes import VolumeService


class FakeBacking:
    """Volumes as directories; `broken` ids fail to attach, as a missing image does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.broken: set[str] = set()
        self.removed: list[str] = []

    def data_dir(self, volume: Volume) -> Path:
        return self.root / volume.id / "data"

    def create(self, volume: Volume) -> None:
        self.data_dir(volume).mkdir(parents=True)

    def attach(self, volume: Volume, fresh: bool = False) -> Path:
        if volume.id in self.broken:
            raise BackingError("its image file image.ext4 is missing")
        return self.data_dir(volume)

    def remove(self, volume: Volume) -> None:
        self.removed.append(volume.id)

    def used_bytes(self, volume: Volume) -> int | None:
        return 0

    def disk_bytes(self, volume: Volume) -> int:
        return GIB // 4


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(tmp_path / "agent.db")
    yield opened
    opened.close()


@pytest.fixture
def blocking() -> Iterator[Blocking]:
    pool = Blocking()
    yield pool
    pool.close()


def _service(store: Store, blocking: Blocking, backing: FakeBacking, free: int) -> VolumeService:
    def copy_tree(source: Path, target: Path) -> None:
        for item in source.iterdir():
            (target / item.name).write_bytes(item.read_bytes())

    return VolumeService(
        store=store,
        blocking=blocking,
        backings={Mechanism.LOOP: backing},
        mechanism=Mechanism.LOOP,
        free_bytes=lambda: free,
        copy_tree=copy_tree,
        clock=lambda: 7.0,
    )


async def test_a_volume_fits_what_is_free_less_what_others_were_promised(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    service = _service(store, blocking, FakeBacking(tmp_path), free=3 * GIB)
    first = await service.create(2)
    assert first.volume.state is State.READY and first.volume.size_bytes == 2 * GIB
    # 3 GiB free, 2 promised of which 0.25 written: 1.25 left.
    with pytest.raises(Conflict, match=r"needs 2\.00 GiB of disk for the volume, 1\.25 GiB free"):
        await service.create(2)
    assert [v.volume.id for v in await service.all()] == [first.volume.id]
    assert await service.promised() == 2 * GIB - GIB // 4


async def test_a_copy_carries_the_files_and_takes_the_sources_size(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    backing = FakeBacking(tmp_path)
    service = _service(store, blocking, backing, free=10 * GIB)
    source = await service.create(1)
    (backing.data_dir(source.volume) / "f").write_text("data")
    copy = await service.create(None, source.volume.id)
    assert copy.volume.size_bytes == GIB
    assert (backing.data_dir(copy.volume) / "f").read_text() == "data"
    with pytest.raises(NotFound):
        await service.create(1, "no-such-volume")


async def test_restore_finishes_cut_short_changes_and_marks_damage(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    backing = FakeBacking(tmp_path)
    service = _service(store, blocking, backing, free=10 * GIB)
    for vid, state in (("c", State.CREATING), ("d", State.DELETING), ("ok", State.READY)):
        store.insert_volume(Volume(vid, GIB, Mechanism.LOOP, state, 1.0))
    store.insert_volume(Volume("bad", GIB, Mechanism.LOOP, State.READY, 1.0))
    store.insert_volume(Volume("healed", GIB, Mechanism.LOOP, State.ERROR, 1.0, reason="x"))
    backing.broken = {"bad"}
    await service.restore()
    assert sorted(backing.removed) == ["c", "d"]
    states = {v.id: (v.state, v.reason) for v in store.list_volumes()}
    assert states["ok"] == (State.READY, None)
    assert states["healed"] == (State.READY, None)
    assert states["bad"][0] is State.ERROR and "image file" in str(states["bad"][1])
    assert "c" not in states and "d" not in states
    with pytest.raises(Conflict, match="damaged"):
        await service.bind({"bad": "/w"})
    with pytest.raises(NotFound):
        await service.bind({"nope": "/w"})
    (mount,) = await service.bind({"ok": "/w"})
    assert (mount.target, mount.read_only) == ("/w", False)


async def test_delete_refuses_a_held_volume_and_removes_a_free_one(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    backing = FakeBacking(tmp_path)
    service = _service(store, blocking, backing, free=10 * GIB)
    view = await service.create(1)
    held = Instance("i-1", Status.PENDING, Wanted.RUNNING, "busybox", "qudata-i-1", {})
    store.insert_instance(held, [view.volume.id])
    with pytest.raises(Conflict, match="in use by instance i-1"):
        await service.delete(view.volume.id)
    store.delete_instance("i-1")
    await service.delete(view.volume.id)
    assert backing.removed == [view.volume.id]
    with pytest.raises(NotFound):
        await service.get(view.volume.id)
