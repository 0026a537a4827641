"""`/v1/volumes` and the create body's `volumes` through `falcon.testing`, a fake service behind."""

from __future__ import annotations

from typing import Any

import falcon.testing
import pytest

from qudata_agent.api.app import ApiDeps, create_app
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.order import CreateOrder
from qudata_agent.domain.volumes import GIB, Mechanism, State, Volume
from qudata_agent.errors import Conflict, NotFound
from qudata_agent.services.volumes import VolumeView

SECRET = "volume-secret"
HEADERS = {"X-Agent-Secret": SECRET, "Content-Type": "application/json"}
VID = "11111111-2222-4333-8444-555555555555"


class FakeInstances:
    """Only create, as the volume tests use it: the orders it was given."""

    def __init__(self) -> None:
        self.orders: list[CreateOrder] = []

    async def create(self, order: CreateOrder) -> Instance:
        self.orders.append(order)
        return Instance(
            id="i-new",
            status=Status.PENDING,
            wanted=Wanted.RUNNING,
            image=order.image,
            container_name="qudata-i-new",
            ports={},
        )


class FakeVolumes:
    def __init__(self) -> None:
        self.volumes: dict[str, Volume] = {}
        self.calls: list[tuple[Any, ...]] = []

    async def create(self, size_gb: float | None, source_id: str | None = None) -> VolumeView:
        self.calls.append(("create", size_gb, source_id))
        if source_id is not None and source_id not in self.volumes:
            raise NotFound(f"no volume {source_id} to copy from")
        size = self.volumes[source_id].size_bytes if size_gb is None and source_id else 0
        volume = Volume(VID, size or int((size_gb or 0) * GIB), Mechanism.LOOP, State.READY, 5.0)
        self.volumes[VID] = volume
        return VolumeView(volume, 4096)

    async def all(self) -> list[VolumeView]:
        return [VolumeView(v, None) for v in self.volumes.values()]

    async def get(self, volume_id: str) -> VolumeView:
        if volume_id not in self.volumes:
            raise NotFound(f"no volume {volume_id}")
        return VolumeView(self.volumes[volume_id], GIB // 4)

    async def delete(self, volume_id: str) -> Volume:
        volume = self.volumes.get(volume_id)
        if volume is None:
            raise NotFound(f"no volume {volume_id}")
        if volume.instance_id is not None:
            raise Conflict(f"volume {volume_id} is in use by instance {volume.instance_id}")
        return self.volumes.pop(volume_id)


def _client(volumes: FakeVolumes, instances: FakeInstances | None = None) -> Any:
    deps = ApiDeps(secret=lambda: SECRET, volumes=volumes, instances=instances)  # type: ignore[arg-type]
    return falcon.testing.TestClient(create_app(deps))


def test_create_answers_201_with_every_field_of_the_contract() -> None:
    volumes = FakeVolumes()
    result = _client(volumes).simulate_post("/v1/volumes", json={"size_gb": 2}, headers=HEADERS)
    assert result.status_code == 201, result.text
    assert result.json == {
        "ok": True,
        "data": {
            "volume_id": VID,
            "size_gb": 2.0,
            "used_gb": 0.0,
            "status": "ready",
            "instance_id": None,
            "created_at": 5.0,
            "reason": None,
            "mechanism": "loop-ext4",
        },
    }
    assert volumes.calls == [("create", 2.0, None)]


def test_from_names_the_source_and_an_unknown_one_is_404() -> None:
    volumes = FakeVolumes()
    client = _client(volumes)
    result = client.simulate_post("/v1/volumes", json={"from": "nope"}, headers=HEADERS)
    assert result.status_code == 404 and "no volume nope" in result.json["error"]
    assert volumes.calls == [("create", None, "nope")]


@pytest.mark.parametrize(
    "body",
    [{"size_gb": 0}, {"size_gb": -1}, {"size_gb": "10"}, {"size_gb": True}, {"from": 5}],
)
def test_bad_create_bodies_are_400_and_reach_no_service(body: dict[str, Any]) -> None:
    volumes = FakeVolumes()
    result = _client(volumes).simulate_post("/v1/volumes", json=body, headers=HEADERS)
    assert result.status_code == 400, result.text
    assert result.json["ok"] is False and volumes.calls == []


def test_list_get_and_delete() -> None:
    volumes = FakeVolumes()
    held = Volume("held", GIB, Mechanism.LOOP, State.READY, 1.0, instance_id="i-1")
    broken = Volume("broken", GIB, Mechanism.LOOP, State.ERROR, 2.0, reason="image missing")
    volumes.volumes = {"held": held, "broken": broken}
    client = _client(volumes)
    listed = client.simulate_get("/v1/volumes", headers=HEADERS).json["data"]["volumes"]
    assert [(v["volume_id"], v["status"], v["used_gb"]) for v in listed] == [
        ("held", "in_use", None),
        ("broken", "error", None),
    ]
    assert listed[1]["reason"] == "image missing"
    one = client.simulate_get("/v1/volumes/held", headers=HEADERS).json["data"]
    assert one["instance_id"] == "i-1" and one["used_gb"] == 0.25
    assert client.simulate_get("/v1/volumes/x", headers=HEADERS).status_code == 404
    busy = client.simulate_delete("/v1/volumes/held", headers=HEADERS)
    assert busy.status_code == 409 and "i-1" in busy.json["error"]
    gone = client.simulate_delete("/v1/volumes/broken", headers=HEADERS)
    assert gone.json == {"ok": True, "data": {"volume_id": "broken", "deleted": True}}


def test_volume_routes_need_the_secret() -> None:
    result = _client(FakeVolumes()).simulate_get("/v1/volumes")
    assert result.status_code == 401


def test_the_create_body_carries_the_volumes_map_to_the_order() -> None:
    instances = FakeInstances()
    client = _client(FakeVolumes(), instances)
    body = {"image": "busybox", "volumes": {VID: "/workspace"}}
    assert client.simulate_post("/v1/instances", json=body, headers=HEADERS).status_code == 202
    assert instances.orders[0].volumes == {VID: "/workspace"}
    bad = {"image": "busybox", "volumes": {VID: 5}}
    assert client.simulate_post("/v1/instances", json=bad, headers=HEADERS).status_code == 400
    assert len(instances.orders) == 1
