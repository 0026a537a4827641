"""The API of several instances per host (CONTRACT.md section 4), over small fake services.

The v1 routes (`/v1/host`, `/v1/instances`, `/v1/instances/{instance_id}`
and its `/ssh`), and how the section 1 routes choose "the" instance over the
collection: the most recently created one for `GET /instances`; `PUT`,
`DELETE` and `/ssh` act on the only one and answer 409 naming the v1 routes
while there are several. The fakes record every call, so a test can tell
that a refused request reached no service and that a route passed on the id
it was given and no other.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import falcon.testing
import pytest

from qudata_agent.api.app import ApiDeps, create_app
from qudata_agent.domain.instance import Action, Instance, Status, Wanted
from qudata_agent.domain.order import CreateOrder
from qudata_agent.domain.placement import Free
from qudata_agent.errors import Conflict, NotFound
from qudata_agent.services.capacity import Disk
from qudata_agent.services.instances import HostView
from qudata_agent.services.views import InstanceView
from qudata_agent.services.volumes import VolumeTotals

SECRET = "v1-secret-value"
AUTH = {"X-Agent-Secret": SECRET}
LIMIT = 4096
JSON = {"Content-Type": "application/json"}
HEADERS = {**AUTH, **JSON}
GIB = 1024**3
KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA a@host"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB b@host"
CREATE = {"image": "qudata-test/busybox", "image_tag": "1", "ports": {"8080": "auto"}}


def _instance(
    instance_id: str, created_at: float, status: Status = Status.RUNNING, port: int = 41000
) -> Instance:
    return Instance(
        id=instance_id,
        status=status,
        wanted=Wanted.RUNNING,
        image="qudata-test/busybox:1",
        container_name=f"qudata-{instance_id}",
        ports={"22": port, "8080": port + 1},
        container_id=f"c-{instance_id}",
        ssh_enabled=True,
        created_at=created_at,
    )


class FakeInstances:
    """The instance service's API surface, over a dict; every call is recorded."""

    def __init__(self, *instances: Instance) -> None:
        self.instances = {i.id: i for i in instances}
        self.calls: list[tuple[Any, ...]] = []
        self.orders: list[CreateOrder] = []
        self.refuse: str | None = None  # create raises Conflict with this message
        self.delete_races = False  # delete finds the instance gone (another delete won)
        self.host_view: HostView | None = None

    async def create(self, order: CreateOrder) -> Instance:
        self.calls.append(("create",))
        if self.refuse is not None:
            raise Conflict(self.refuse)
        self.orders.append(order)
        created = replace(
            _instance(f"new-{len(self.orders)}", 1000.0 + len(self.orders), port=43000),
            status=Status.PENDING,
            container_id=None,
        )
        self.instances[created.id] = created
        return created

    async def all(self) -> list[Instance]:
        self.calls.append(("all",))
        return sorted(self.instances.values(), key=lambda i: i.created_at)

    async def get(self, instance_id: str) -> Instance:
        self.calls.append(("get", instance_id))
        if instance_id not in self.instances:
            raise NotFound(f"no instance {instance_id}")
        return self.instances[instance_id]

    async def latest(self) -> Instance | None:
        self.calls.append(("latest",))
        return max(self.instances.values(), key=lambda i: i.created_at, default=None)

    async def describe(
        self, instance: Instance | None, logs: bool = False, tail: int = 100
    ) -> InstanceView:
        self.calls.append(("describe", None if instance is None else instance.id, logs, tail))
        if instance is None:
            return InstanceView(None)
        return InstanceView(instance, logs=f"logs of {instance.id}" if logs else None)

    async def describe_all(self) -> list[InstanceView]:
        return [await self.describe(i) for i in await self.all()]

    async def act(self, instance_id: str, action: Action) -> Instance:
        self.calls.append(("act", instance_id, action))
        instance = await self.get(instance_id)
        status = Status.PAUSED if action is Action.STOP else Status.RUNNING
        self.instances[instance_id] = replace(instance, status=status)
        return self.instances[instance_id]

    async def delete(self, instance_id: str) -> Instance:
        self.calls.append(("delete", instance_id))
        if self.delete_races:
            self.instances.pop(instance_id, None)
            raise NotFound(f"no instance {instance_id}")
        instance = await self.get(instance_id)
        del self.instances[instance_id]
        return instance

    async def host(self) -> HostView:
        self.calls.append(("host",))
        assert self.host_view is not None
        return self.host_view

    def changes(self) -> list[tuple[Any, ...]]:
        """The calls that change something."""
        return [c for c in self.calls if c[0] in ("create", "act", "delete")]


class FakeSsh:
    """Keys per instance id; unknown ids and keys are NotFound, as the real service."""

    def __init__(self, *instance_ids: str) -> None:
        self.keys_of: dict[str, list[str]] = {i: [] for i in instance_ids}
        self.calls: list[tuple[str, str]] = []  # (method, instance id)

    def _of(self, instance_id: str) -> list[str]:
        if instance_id not in self.keys_of:
            raise NotFound(f"no instance {instance_id}")
        return self.keys_of[instance_id]

    async def keys(self, instance_id: str) -> list[str]:
        self.calls.append(("keys", instance_id))
        return list(self._of(instance_id))

    async def add_key(self, instance_id: str, text: str) -> bool:
        self.calls.append(("add_key", instance_id))
        keys = self._of(instance_id)
        if text in keys:
            return False
        keys.append(text)
        return True

    async def remove_key(self, instance_id: str, text: str) -> None:
        self.calls.append(("remove_key", instance_id))
        keys = self._of(instance_id)
        if text not in keys:
            raise NotFound("that key is not on this instance")
        keys.remove(text)


def _client(
    instances: FakeInstances, ssh: FakeSsh | None = None, tls_pin: str | None = None
) -> falcon.testing.TestClient:
    deps = ApiDeps(
        secret=lambda: SECRET,
        max_body_bytes=LIMIT,
        instances=instances,
        ssh=ssh if ssh is not None else FakeSsh(*instances.instances),
        tls_pin=tls_pin,
    )
    return falcon.testing.TestClient(create_app(deps))


def _failure(result: falcon.testing.Result, status: int) -> str:
    assert result.status_code == status, result.text
    assert result.json.keys() == {"ok", "error"}
    assert result.json["ok"] is False
    assert result.json["error"]
    return str(result.json["error"])


def _data(result: falcon.testing.Result, status: int = 200) -> Any:
    assert result.status_code == status, result.text
    assert result.json["ok"] is True
    return result.json["data"]


# Three instances, created in the order a, b, c; stored out of that order, so
# that "the most recent" cannot be read off the order of the collection.
A = _instance("a", 100.0, port=41000)
B = _instance("b", 200.0, Status.PAUSED, port=41010)
C = _instance("c", 300.0, Status.PENDING, port=41020)


@pytest.fixture
def three() -> FakeInstances:
    return FakeInstances(B, C, A)


# -- GET /v1/host -------------------------------------------------------------------


def _host_view(disk_total: int | None = 500 * GIB) -> HostView:
    return HostView(
        max_instances=8,
        instances=3,
        gpus=("GPU-1", "GPU-2", "GPU-3", "GPU-4"),
        free=Free(
            instances=5,
            gpus=("GPU-2", "GPU-4"),
            cpu_cores=9.5,
            memory_bytes=int(40.5 * GIB),
            disk_bytes=None if disk_total is None else 123 * GIB + GIB // 3,
        ),
        cpu_cores=30.0,
        memory_bytes=126 * GIB,
        disk=Disk(total_bytes=disk_total, free_bytes=None if disk_total is None else 200 * GIB),
        port_range=(40000, 40099),
        ports_free=94,
        volumes=VolumeTotals(count=2, size_bytes=3 * GIB, disk_bytes=GIB // 2),
        isolation=("container", "sandbox"),
    )


def test_host_answers_every_field_of_the_contract() -> None:
    service = FakeInstances()
    service.host_view = _host_view()
    data = _data(_client(service, tls_pin="PIN=").simulate_get("/v1/host", headers=AUTH))
    assert data == {
        "max_instances": 8,
        "instances": 3,
        "gpus": {"total": 4, "free": ["GPU-2", "GPU-4"]},
        "cpu_cores": {"total": 30.0, "free": 9.5},
        "memory_gb": {"total": 126.0, "free": 40.5},
        "disk_gb": {"total": 500.0, "free": 123.33},
        "ports": {"range": "40000-40099", "free": 94},
        "volumes": {"count": 2, "disk_gb": 3.0, "used_gb": 0.5},
        "tunnel": None,
        "tls_pubkey_sha256": "PIN=",  # CONTRACT.md section 5
        "isolation": ["container", "sandbox"],
    }


def test_host_shows_the_tunnel_in_tunnel_mode() -> None:
    service = FakeInstances()
    service.host_view = _host_view()
    view = {
        "state": "up",
        "interface": "qudata-wg",
        "endpoint": "relay.example.com:51820",
        "address": "10.77.0.2/24",
        "public_address": "198.51.100.1",
        "last_handshake_at": 1700000000.0,
        "handshake_age_s": 12.5,
        "problem": None,
    }
    deps = ApiDeps(secret=lambda: SECRET, instances=service, tunnel=lambda: view)
    client = falcon.testing.TestClient(create_app(deps))
    data = _data(client.simulate_get("/v1/host", headers=AUTH))
    assert data["tunnel"] == view


def test_host_with_an_unmeasured_disk_answers_null_not_zero() -> None:
    service = FakeInstances()
    service.host_view = _host_view(disk_total=None)
    data = _data(_client(service).simulate_get("/v1/host", headers=AUTH))
    assert data["disk_gb"] == {"total": None, "free": None}
    assert data["memory_gb"]["total"] == 126.0


def test_host_never_shows_more_free_than_admission_grants() -> None:
    """Free memory and disk are rounded down: an order for the figure shown fits."""
    service = FakeInstances()
    view = _host_view()
    almost = int(40.4999 * GIB)  # rounded to nearest this would read 40.5, which does not fit
    service.host_view = replace(
        view, free=replace(view.free, memory_bytes=almost, disk_bytes=almost)
    )
    data = _data(_client(service).simulate_get("/v1/host", headers=AUTH))
    assert data["memory_gb"]["free"] == 40.49
    assert data["disk_gb"]["free"] == 40.49
    assert data["memory_gb"]["free"] * GIB <= almost


# -- GET and POST /v1/instances ------------------------------------------------------


def test_the_list_has_every_instance_view_oldest_first(three: FakeInstances) -> None:
    data = _data(_client(three).simulate_get("/v1/instances", headers=AUTH))
    assert data.keys() == {"instances"}
    listed = data["instances"]
    assert [i["instance_id"] for i in listed] == ["a", "b", "c"]
    assert [i["status"] for i in listed] == ["running", "paused", "pending"]
    assert [i["container_id"] for i in listed] == ["c-a", "c-b", "c-c"]
    assert listed[1]["allocated_ports"] == {"22": "41010", "8080": "41011"}
    described = [c[1] for c in three.calls if c[0] == "describe"]
    assert described == ["a", "b", "c"]


def test_the_list_with_no_instance_is_empty() -> None:
    data = _data(_client(FakeInstances()).simulate_get("/v1/instances", headers=AUTH))
    assert data == {"instances": []}


def test_create_answers_202_with_id_status_and_ports(three: FakeInstances) -> None:
    body = {**CREATE, "env_variables": {"QUDATA_CPU_CORES": 0.2, "N": 3}, "ssh_enabled": True}
    result = _client(three).simulate_post("/v1/instances", headers=HEADERS, json=body)
    data = _data(result, 202)
    assert data == {
        "success": True,
        "instance_id": "new-1",
        "status": "pending",
        "ports": {"22": "43000", "8080": "43001"},
    }
    (order,) = three.orders
    assert order.image == "qudata-test/busybox"
    assert order.image_tag == "1"
    assert order.env == {"QUDATA_CPU_CORES": "0.2", "N": "3"}
    assert order.ports == {"8080": "auto"}
    assert order.ssh_enabled is True
    assert order.credentials is None


def test_create_that_does_not_fit_is_409_with_the_service_message(three: FakeInstances) -> None:
    three.refuse = "needs 2 GPUs, 1 free"
    result = _client(three).simulate_post("/v1/instances", headers=HEADERS, json=CREATE)
    assert _failure(result, 409) == "needs 2 GPUs, 1 free"
    assert set(three.instances) == {"a", "b", "c"}


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"image_tag": "1"}, "field 'image'"),
        ({**CREATE, "ssh_enabled": "yes"}, "field 'ssh_enabled'"),
        ({**CREATE, "login": "someone"}, "login and password"),
        ({**CREATE, "storage_gb": -1}, "field 'storage_gb'"),
    ],
)
def test_a_bad_create_body_is_400_and_reaches_no_service(
    three: FakeInstances, body: dict[str, Any], named: str
) -> None:
    result = _client(three).simulate_post("/v1/instances", headers=HEADERS, json=body)
    assert named in _failure(result, 400)
    assert three.changes() == []
    assert three.orders == []


def test_a_create_body_over_the_limit_is_413_and_reaches_no_service(three: FakeInstances) -> None:
    body = {**CREATE, "command": "x" * LIMIT}
    result = _client(three).simulate_post("/v1/instances", headers=HEADERS, json=body)
    assert str(LIMIT) in _failure(result, 413)
    assert three.calls == []


# -- /v1/instances/{instance_id} ------------------------------------------------------


def test_get_by_id_answers_that_instance_not_the_latest(three: FakeInstances) -> None:
    data = _data(_client(three).simulate_get("/v1/instances/a", headers=AUTH))
    assert data["instance_id"] == "a"
    assert data["status"] == "running"
    assert data["allocated_ports"] == {"22": "41000", "8080": "41001"}
    assert data["logs"] is None


def test_get_by_id_passes_logs_and_tail_on(three: FakeInstances) -> None:
    result = _client(three).simulate_get(
        "/v1/instances/b", headers=AUTH, params={"logs": "true", "tail": "7"}
    )
    assert _data(result)["logs"] == "logs of b"
    assert ("describe", "b", True, 7) in three.calls


@pytest.mark.parametrize("query", [{"logs": "maybe"}, {"tail": "0"}, {"tail": "lots"}])
def test_get_by_id_with_a_bad_query_is_400(three: FakeInstances, query: dict[str, str]) -> None:
    result = _client(three).simulate_get("/v1/instances/a", headers=AUTH, params=query)
    _failure(result, 400)
    assert not [c for c in three.calls if c[0] == "describe"]


@pytest.mark.parametrize(
    ("method", "body"), [("GET", None), ("PUT", {"action": "stop"}), ("DELETE", None)]
)
def test_an_unknown_id_is_a_404_envelope(
    three: FakeInstances, method: str, body: dict[str, str] | None
) -> None:
    result = _client(three).simulate_request(
        method, "/v1/instances/nope", headers=HEADERS, json=body
    )
    assert "nope" in _failure(result, 404)
    assert set(three.instances) == {"a", "b", "c"}
    assert three.instances["a"].status is Status.RUNNING


@pytest.mark.parametrize(
    ("body", "action"),
    [({"action": "stop"}, Action.STOP), ({"command": "restart"}, Action.RESTART)],
)
def test_put_by_id_acts_on_that_instance_only(
    three: FakeInstances, body: dict[str, str], action: Action
) -> None:
    result = _client(three).simulate_put("/v1/instances/b", headers=HEADERS, json=body)
    data = _data(result)
    assert data["instance_id"] == "b"
    assert data["status"] == ("paused" if action is Action.STOP else "running")
    assert three.changes() == [("act", "b", action)]


@pytest.mark.parametrize(
    "body", [{"action": "explode"}, {"action": ""}, {}, {"action": ["stop"]}, {"verb": "stop"}]
)
def test_put_by_id_with_a_bad_action_is_400_and_acts_on_nothing(
    three: FakeInstances, body: dict[str, Any]
) -> None:
    result = _client(three).simulate_put("/v1/instances/a", headers=HEADERS, json=body)
    assert "field 'action'" in _failure(result, 400)
    assert three.changes() == []


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        (HEADERS, b"{not json", 400),
        (AUTH, json.dumps({"action": "stop"}).encode(), 400),  # no Content-Type
        (HEADERS, json.dumps({"action": "stop", "pad": "x" * LIMIT}).encode(), 413),
    ],
)
def test_a_bad_put_body_is_refused_before_the_id_is_looked_up(
    three: FakeInstances, headers: dict[str, str], body: bytes, status: int
) -> None:
    """Even for an id that does not exist: the body is checked first, the service never asked."""
    for path in ("/v1/instances/a", "/v1/instances/nope"):
        _failure(_client(three).simulate_put(path, headers=headers, body=body), status)
    assert three.calls == []


def test_delete_by_id_removes_that_instance_and_leaves_the_others(three: FakeInstances) -> None:
    data = _data(_client(three).simulate_delete("/v1/instances/b", headers=AUTH))
    assert data["instance_id"] == "b"
    assert data["status"] == "destroyed"
    assert data["container_id"] is None
    assert set(three.instances) == {"a", "c"}
    assert three.changes() == [("delete", "b")]


def test_a_uuid_id_reaches_the_service_as_given() -> None:
    instance_id = "6f1c2a9e-0b7d-4c3e-9a51-2d8e4f60b7aa"  # the shape the service makes
    service = FakeInstances(_instance(instance_id, 5.0))
    data = _data(_client(service).simulate_get(f"/v1/instances/{instance_id}", headers=AUTH))
    assert data["instance_id"] == instance_id
    assert ("get", instance_id) in service.calls


# -- /v1/instances/{instance_id}/ssh ------------------------------------------------------


def _post_key(client: falcon.testing.TestClient, path: str, key: str) -> falcon.testing.Result:
    return client.simulate_post(path, headers=HEADERS, json={"ssh_pubkey": key})


def test_a_key_posted_for_one_instance_reaches_only_its_keys(three: FakeInstances) -> None:
    ssh = FakeSsh("a", "b", "c")
    client = _client(three, ssh)
    data = _data(_post_key(client, "/v1/instances/b/ssh", KEY_A))
    assert data == {"keys": [KEY_A], "added": True}
    assert ssh.keys_of == {"a": [], "b": [KEY_A], "c": []}
    assert {instance_id for _, instance_id in ssh.calls} == {"b"}
    for other in ("a", "c"):
        assert _data(client.simulate_get(f"/v1/instances/{other}/ssh", headers=AUTH)) == {
            "keys": [],
            "added": None,
        }
    assert _data(client.simulate_get("/v1/instances/b/ssh", headers=AUTH))["keys"] == [KEY_A]


def test_a_key_posted_twice_is_not_added_twice(three: FakeInstances) -> None:
    ssh = FakeSsh("a", "b", "c")
    client = _client(three, ssh)
    _data(_post_key(client, "/v1/instances/a/ssh", KEY_A))
    assert _data(_post_key(client, "/v1/instances/a/ssh", KEY_A)) == {
        "keys": [KEY_A],
        "added": False,
    }


def test_the_public_key_alias_is_accepted(three: FakeInstances) -> None:
    ssh = FakeSsh("a", "b", "c")
    result = _client(three, ssh).simulate_post(
        "/v1/instances/c/ssh", headers=HEADERS, json={"public_key": KEY_B}
    )
    assert _data(result)["keys"] == [KEY_B]
    assert ssh.keys_of["c"] == [KEY_B]


def test_delete_key_removes_it_from_that_instance_only(three: FakeInstances) -> None:
    ssh = FakeSsh("a", "b", "c")
    ssh.keys_of.update(a=[KEY_A, KEY_B], b=[KEY_A])
    result = _client(three, ssh).simulate_delete(
        "/v1/instances/a/ssh", headers=HEADERS, json={"ssh_pubkey": KEY_A}
    )
    assert _data(result) == {"keys": [KEY_B], "added": None}
    assert ssh.keys_of == {"a": [KEY_B], "b": [KEY_A], "c": []}
    assert {instance_id for _, instance_id in ssh.calls} == {"a"}


def test_deleting_a_key_of_another_instance_is_404_and_keeps_it(three: FakeInstances) -> None:
    ssh = FakeSsh("a", "b", "c")
    client = _client(three, ssh)
    _data(_post_key(client, "/v1/instances/a/ssh", KEY_A))
    result = client.simulate_delete(
        "/v1/instances/b/ssh", headers=HEADERS, json={"ssh_pubkey": KEY_A}
    )
    _failure(result, 404)
    assert ssh.keys_of["a"] == [KEY_A]


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_ssh_of_an_unknown_instance_is_404(three: FakeInstances, method: str) -> None:
    ssh = FakeSsh("a", "b", "c")
    body = None if method == "GET" else {"ssh_pubkey": KEY_A}
    result = _client(three, ssh).simulate_request(
        method, "/v1/instances/nope/ssh", headers=HEADERS, json=body
    )
    assert "nope" in _failure(result, 404)
    assert ssh.keys_of == {"a": [], "b": [], "c": []}


@pytest.mark.parametrize("method", ["POST", "DELETE"])
@pytest.mark.parametrize(
    ("body", "status"),
    [(b'{"ssh_pubkey": 42}', 400), (b"", 400), (b'{"key": "x"}', 400), (b" " * (LIMIT + 1), 413)],
)
def test_a_bad_key_body_is_refused_before_the_service_is_asked(
    three: FakeInstances, method: str, body: bytes, status: int
) -> None:
    ssh = FakeSsh("a", "b", "c")
    result = _client(three, ssh).simulate_request(
        method, "/v1/instances/a/ssh", headers=HEADERS, body=body
    )
    _failure(result, status)
    assert ssh.calls == []


# -- the section 1 routes over several instances ---------------------------------------------


def test_get_instances_with_several_answers_the_most_recently_created(
    three: FakeInstances,
) -> None:
    data = _data(_client(three).simulate_get("/instances", headers=AUTH))
    assert data["instance_id"] == "c"
    assert data["status"] == "pending"
    assert data["allocated_ports"] == {"22": "41020", "8080": "41021"}


def test_get_instances_passes_logs_and_tail_on(three: FakeInstances) -> None:
    result = _client(three).simulate_get(
        "/instances", headers=AUTH, params={"logs": "1", "tail": "3"}
    )
    assert _data(result)["logs"] == "logs of c"
    assert ("describe", "c", True, 3) in three.calls


def _assert_names_v1(message: str) -> None:
    assert "/v1/instances" in message
    assert "3 instances" in message


@pytest.mark.parametrize("body", [{"action": "stop"}, {"command": "restart"}])
def test_put_instances_with_several_is_409_naming_v1(
    three: FakeInstances, body: dict[str, str]
) -> None:
    result = _client(three).simulate_put("/instances", headers=HEADERS, json=body)
    _assert_names_v1(_failure(result, 409))
    assert three.changes() == []
    assert three.instances["a"].status is Status.RUNNING


def test_delete_instances_with_several_is_409_naming_v1(three: FakeInstances) -> None:
    result = _client(three).simulate_delete("/instances", headers=AUTH)
    _assert_names_v1(_failure(result, 409))
    assert three.changes() == []
    assert set(three.instances) == {"a", "b", "c"}


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_ssh_with_several_is_409_naming_v1(three: FakeInstances, method: str) -> None:
    ssh = FakeSsh("a", "b", "c")
    ssh.keys_of["c"] = [KEY_A]
    body = None if method == "GET" else {"ssh_pubkey": KEY_A}
    result = _client(three, ssh).simulate_request(method, "/ssh", headers=HEADERS, json=body)
    _assert_names_v1(_failure(result, 409))
    assert ssh.calls == []
    assert ssh.keys_of == {"a": [], "b": [], "c": [KEY_A]}


def test_post_instances_with_several_goes_to_the_same_create(three: FakeInstances) -> None:
    result = _client(three).simulate_post("/instances", headers=HEADERS, json=CREATE)
    assert _data(result, 202)["instance_id"] == "new-1"
    assert three.changes() == [("create",)]


def test_post_instances_refused_by_admission_is_409(three: FakeInstances) -> None:
    three.refuse = "the host runs 3 of 3 instances"
    result = _client(three).simulate_post("/instances", headers=HEADERS, json=CREATE)
    assert _failure(result, 409) == "the host runs 3 of 3 instances"


# -- the section 1 routes over one instance and over none --------------------------------------


@pytest.fixture
def one() -> FakeInstances:
    return FakeInstances(B)


def test_get_instances_with_one_answers_it(one: FakeInstances) -> None:
    data = _data(_client(one).simulate_get("/instances", headers=AUTH))
    assert (data["instance_id"], data["status"]) == ("b", "paused")


def test_put_instances_with_one_acts_on_it(one: FakeInstances) -> None:
    result = _client(one).simulate_put("/instances", headers=HEADERS, json={"action": "start"})
    data = _data(result)
    assert (data["instance_id"], data["status"]) == ("b", "running")
    assert one.changes() == [("act", "b", Action.START)]


def test_put_instances_with_a_bad_action_is_400_before_anything(one: FakeInstances) -> None:
    result = _client(one).simulate_put("/instances", headers=HEADERS, json={"action": "nuke"})
    _failure(result, 400)
    assert one.calls == []


def test_delete_instances_with_one_deletes_it(one: FakeInstances) -> None:
    data = _data(_client(one).simulate_delete("/instances", headers=AUTH))
    assert data == {**data, "instance_id": "b", "container_id": None, "status": "destroyed"}
    assert one.instances == {}
    assert one.changes() == [("delete", "b")]


def test_delete_instances_racing_another_delete_still_answers_200(one: FakeInstances) -> None:
    one.delete_races = True
    data = _data(_client(one).simulate_delete("/instances", headers=AUTH))
    assert (data["instance_id"], data["status"]) == ("b", "destroyed")
    assert one.changes() == [("delete", "b")]


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_ssh_with_one_acts_on_its_keys(one: FakeInstances, method: str) -> None:
    ssh = FakeSsh("b", "other")
    ssh.keys_of["b"] = [KEY_B]
    body = None if method == "GET" else {"ssh_pubkey": KEY_B if method == "DELETE" else KEY_A}
    result = _client(one, ssh).simulate_request(method, "/ssh", headers=HEADERS, json=body)
    expected = {"GET": [KEY_B], "POST": [KEY_B, KEY_A], "DELETE": []}[method]
    assert _data(result)["keys"] == expected
    assert ssh.keys_of == {"b": expected, "other": []}
    assert {instance_id for _, instance_id in ssh.calls} == {"b"}


def test_get_instances_with_none_answers_destroyed() -> None:
    data = _data(_client(FakeInstances()).simulate_get("/instances", headers=AUTH))
    assert (data["instance_id"], data["container_id"], data["status"]) == (
        None,
        None,
        "destroyed",
    )


def test_delete_instances_with_none_answers_200_destroyed() -> None:
    service = FakeInstances()
    data = _data(_client(service).simulate_delete("/instances", headers=AUTH))
    assert (data["instance_id"], data["status"]) == (None, "destroyed")
    assert service.changes() == []


def test_put_instances_with_none_is_404() -> None:
    service = FakeInstances()
    result = _client(service).simulate_put("/instances", headers=HEADERS, json={"action": "stop"})
    _failure(result, 404)
    assert service.changes() == []


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_ssh_with_none_is_404(method: str) -> None:
    ssh = FakeSsh()
    body = None if method == "GET" else {"ssh_pubkey": KEY_A}
    result = _client(FakeInstances(), ssh).simulate_request(
        method, "/ssh", headers=HEADERS, json=body
    )
    _failure(result, 404)
    assert ssh.calls == []


# -- the secret, and the document --------------------------------------------------------------

V1_OPERATIONS = [
    ("GET", "/v1/host"),
    ("GET", "/v1/instances"),
    ("POST", "/v1/instances"),
    ("GET", "/v1/instances/a"),
    ("PUT", "/v1/instances/a"),
    ("DELETE", "/v1/instances/a"),
    ("GET", "/v1/instances/a/ssh"),
    ("POST", "/v1/instances/a/ssh"),
    ("DELETE", "/v1/instances/a/ssh"),
]


@pytest.mark.parametrize(("method", "path"), V1_OPERATIONS)
@pytest.mark.parametrize("secret", [None, "", "wrong", SECRET + "x"])
def test_every_v1_route_needs_the_secret(
    three: FakeInstances, method: str, path: str, secret: str | None
) -> None:
    ssh = FakeSsh("a", "b", "c")
    three.host_view = _host_view()
    headers = dict(JSON) if secret is None else {**JSON, "X-Agent-Secret": secret}
    body = {**CREATE, "action": "stop", "ssh_pubkey": KEY_A}
    result = _client(three, ssh).simulate_request(method, path, headers=headers, json=body)
    assert "X-Agent-Secret" in _failure(result, 401)
    assert three.calls == []
    assert ssh.calls == []


@pytest.mark.parametrize(("method", "path"), V1_OPERATIONS)
def test_every_v1_route_opens_with_the_secret(three: FakeInstances, method: str, path: str) -> None:
    """The other half of the test above: the same requests with the secret succeed."""
    three.host_view = _host_view()
    ssh = FakeSsh("a", "b", "c")
    ssh.keys_of["a"] = [KEY_A]
    body = {**CREATE, "action": "stop", "ssh_pubkey": KEY_A}
    result = _client(three, ssh).simulate_request(method, path, headers=HEADERS, json=body)
    assert result.status_code in (200, 202), result.text
    assert result.json["ok"] is True


PATH_PARAM = {"name": "instance_id", "in": "path", "required": True, "schema": {"type": "string"}}


def test_the_document_names_the_path_parameter_of_templated_paths(three: FakeInstances) -> None:
    doc = _data_raw(_client(three).simulate_get("/openapi.json", headers=AUTH))
    templated = [path for path in doc["paths"] if "{" in path]
    assert sorted(templated) == ["/v1/instances/{instance_id}", "/v1/instances/{instance_id}/ssh"]
    for path in templated:
        methods = doc["paths"][path]
        assert set(methods) == (
            {"get", "put", "delete"} if path.endswith("}") else {"get", "post", "delete"}
        )
        for method, op in methods.items():
            in_path = [p for p in op.get("parameters", []) if p["in"] == "path"]
            assert in_path == [PATH_PARAM], (method, path)
    for path in ("/v1/host", "/v1/instances", "/instances", "/ssh"):
        for op in doc["paths"][path].values():
            assert [p for p in op.get("parameters", []) if p["in"] == "path"] == [], path


def test_the_document_lists_the_query_of_get_by_id(three: FakeInstances) -> None:
    doc = _data_raw(_client(three).simulate_get("/openapi.json", headers=AUTH))
    query = [
        p["name"]
        for p in doc["paths"]["/v1/instances/{instance_id}"]["get"]["parameters"]
        if p["in"] == "query"
    ]
    assert query == ["logs", "tail"]


def _data_raw(result: falcon.testing.Result) -> dict[str, Any]:
    assert result.status_code == 200
    return dict(result.json)
