"""Port requests and the host-port allocator: checks, round-robin, all or nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from qudata_agent.domain.ports import MAX_PORTS, PortAllocator, parse_port_requests
from qudata_agent.errors import Conflict, InvalidRequest


def _always(port: int, protocol: str) -> bool:
    return True


def _allocator(
    low: int = 40000,
    high: int = 40099,
    reserved: frozenset[int] = frozenset(),
    bindable: Callable[[int, str], bool] = _always,
    start: int | None = None,
) -> PortAllocator:
    return PortAllocator((low, high), reserved, bindable, start)


# -- parse_port_requests ---------------------------------------------------------


def test_parse_normalises_keys_and_values() -> None:
    requests = parse_port_requests(
        {"8080": "auto", "3000": "3000", "9000/tcp": 9001, "53/udp": "AUTO", "7/UDP": 7007},
        ssh_enabled=False,
    )
    assert requests == {"8080": None, "3000": 3000, "9000": 9001, "53/udp": None, "7/udp": 7007}


def test_parse_adds_ssh_as_auto() -> None:
    assert parse_port_requests({"8080": "auto"}, ssh_enabled=True) == {"8080": None, "22": None}
    assert parse_port_requests(None, ssh_enabled=True) == {"22": None}
    assert parse_port_requests(None, ssh_enabled=False) == {}


def test_parse_keeps_a_fixed_ssh_port() -> None:
    assert parse_port_requests({"22/tcp": "2222"}, ssh_enabled=True) == {"22": 2222}


def test_parse_ssh_over_udp_22_still_gets_tcp_22() -> None:
    assert parse_port_requests({"22/udp": "auto"}, ssh_enabled=True) == {
        "22/udp": None,
        "22": None,
    }


@pytest.mark.parametrize(
    ("ports", "field"),
    [
        ({"0": "auto"}, "ports.0"),
        ({"65536": "auto"}, "ports.65536"),
        ({"080": "auto"}, "ports.080"),
        ({"http": "auto"}, "ports.http"),
        ({"80/sctp": "auto"}, "ports.80/sctp"),
        ({"": "auto"}, "ports."),
        ({" 80": "auto"}, "ports. 80"),
        ({"80": "0"}, "ports.80"),
        ({"80": 0}, "ports.80"),
        ({"80": 65536}, "ports.80"),
        ({"80": "65536"}, "ports.80"),
        ({"80": "-1"}, "ports.80"),
        ({"80": "random"}, "ports.80"),
        ({"80": ""}, "ports.80"),
        ({"80": None}, "ports.80"),
        ({"80": True}, "ports.80"),
        ({"80": 80.0}, "ports.80"),
        ({"80/tcp": "x"}, "ports.80/tcp"),
    ],
)
def test_parse_refuses_bad_entries(ports: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_port_requests(ports, ssh_enabled=False)
    assert f"'{field}'" in caught.value.message


def test_parse_refuses_the_same_container_port_twice() -> None:
    with pytest.raises(InvalidRequest, match=r"ports\.8080/tcp"):
        parse_port_requests({"8080": "auto", "8080/tcp": "auto"}, ssh_enabled=False)


def test_parse_refuses_duplicate_fixed_host_ports() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_port_requests({"80": "5000", "81": 5000}, ssh_enabled=False)
    assert "'ports.81'" in caught.value.message
    assert "ports.80" in caught.value.message


def test_parse_refuses_duplicate_fixed_host_ports_across_protocols() -> None:
    with pytest.raises(InvalidRequest, match=r"ports\.53/udp"):
        parse_port_requests({"53": 5353, "53/udp": 5353}, ssh_enabled=False)


def test_parse_limits_the_number_of_ports() -> None:
    at_limit = {str(1000 + i): "auto" for i in range(MAX_PORTS)}
    assert len(parse_port_requests(at_limit, ssh_enabled=False)) == MAX_PORTS
    with pytest.raises(InvalidRequest, match="'ports'"):
        parse_port_requests({**at_limit, "2000": "auto"}, ssh_enabled=False)
    with pytest.raises(InvalidRequest, match="'ports'"):
        parse_port_requests(at_limit, ssh_enabled=True)  # 22 makes it 65


def test_parse_message_does_not_echo_a_long_value_whole() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_port_requests({"80": "s3cr3t-" + "x" * 100}, ssh_enabled=False)
    assert "x" * 30 not in caught.value.message


# -- PortAllocator ---------------------------------------------------------------


def test_twenty_allocations_in_a_row_are_distinct() -> None:
    allocator = _allocator(40000, 40099)
    taken: set[int] = set()
    for _ in range(20):
        result = allocator.allocate({"22": None, "8080": None, "53/udp": None}, taken)
        assert len(set(result.values())) == 3
        assert not taken & set(result.values())
        taken |= set(result.values())
    assert len(taken) == 60
    assert all(40000 <= port <= 40099 for port in taken)


def test_fixed_and_auto_mix() -> None:
    allocator = _allocator(40000, 40004)
    result = allocator.allocate({"3000": 3000, "8080": None, "80": 40000, "22": None}, [40001])
    assert result["3000"] == 3000
    assert result["80"] == 40000
    # auto ports skip the fixed one (40000) and the taken one (40001)
    assert (result["8080"], result["22"]) == (40002, 40003)
    assert list(result) == ["3000", "8080", "80", "22"]  # the request's order


def test_exhaustion_of_a_three_port_range() -> None:
    allocator = _allocator(40000, 40002)
    first = allocator.allocate({"1": None, "2": None}, set())
    second = allocator.allocate({"3": None}, set(first.values()))
    assert set(first.values()) | set(second.values()) == {40000, 40001, 40002}
    with pytest.raises(Conflict, match="no free host port in range 40000-40002"):
        allocator.allocate({"4": None}, {40000, 40001, 40002})


def test_asking_for_more_than_the_range_holds_fails_whole() -> None:
    allocator = _allocator(40000, 40002)
    cursor = allocator.cursor
    with pytest.raises(Conflict, match="no free host port"):
        allocator.allocate({"1": None, "2": None, "3": None, "4": None}, set())
    assert allocator.cursor == cursor  # nothing handed out, cursor untouched
    assert set(allocator.allocate({"1": None}, set()).values()) == {40000}


def test_unbindable_ports_are_skipped() -> None:
    asked: list[tuple[int, str]] = []

    def bindable(port: int, protocol: str) -> bool:
        asked.append((port, protocol))
        return port not in (40000, 40001, 40003)

    allocator = _allocator(40000, 40009, bindable=bindable)
    result = allocator.allocate({"22": None, "53/udp": None}, set())
    assert result == {"22": 40002, "53/udp": 40004}
    assert (40002, "tcp") in asked
    assert (40004, "udp") in asked


def test_bindable_is_asked_per_protocol() -> None:
    def tcp_only_busy(port: int, protocol: str) -> bool:
        return not (port == 40000 and protocol == "tcp")

    allocator = _allocator(40000, 40009, bindable=tcp_only_busy)
    assert allocator.allocate({"53/udp": None}, set()) == {"53/udp": 40000}
    allocator = _allocator(40000, 40009, bindable=tcp_only_busy)
    assert allocator.allocate({"53": None}, set()) == {"53": 40001}


def test_nothing_bindable_is_a_conflict() -> None:
    allocator = _allocator(40000, 40004, bindable=lambda port, protocol: False)
    with pytest.raises(Conflict, match="no free host port in range 40000-40004"):
        allocator.allocate({"22": None}, set())


def test_round_robin_does_not_reuse_a_freed_port_at_once() -> None:
    allocator = _allocator(40000, 40009)
    first = allocator.allocate({"22": None}, set())
    assert first == {"22": 40000}
    # 40000 was freed (not in taken any more), yet the next scan starts after it
    assert allocator.allocate({"22": None}, set()) == {"22": 40001}


def test_wraps_around_to_the_start_of_the_range() -> None:
    allocator = _allocator(40000, 40004, start=40003)
    assert allocator.allocate({"a": None, "b": None, "c": None}, {40004}) == {
        "a": 40003,
        "b": 40000,
        "c": 40001,
    }
    assert allocator.cursor == 40002
    assert allocator.allocate({"d": None}, {40000, 40001, 40003, 40004}) == {"d": 40002}
    assert allocator.cursor == 40003


def test_cursor_wraps_after_the_last_port() -> None:
    allocator = _allocator(40000, 40002, start=40002)
    assert allocator.allocate({"a": None}, set()) == {"a": 40002}
    assert allocator.cursor == 40000


def test_start_outside_the_range_begins_at_the_low_end() -> None:
    assert _allocator(40000, 40009, start=12).cursor == 40000
    assert _allocator(40000, 40009).cursor == 40000


def test_reserved_agent_port_is_never_given() -> None:
    allocator = _allocator(40000, 40003, reserved=frozenset({40001}))
    given: set[int] = set()
    for _ in range(3):
        given |= set(allocator.allocate({"22": None}, given).values())
    assert given == {40000, 40002, 40003}
    with pytest.raises(Conflict, match="no free host port"):
        allocator.allocate({"22": None}, given)


def test_fixed_reserved_port_is_a_conflict() -> None:
    allocator = _allocator(reserved=frozenset({8090}))
    with pytest.raises(Conflict) as caught:
        allocator.allocate({"80": 8090}, set())
    assert "'ports.80'" in caught.value.message
    assert "port 8090 is the agent's own port" in caught.value.message


def test_fixed_taken_port_is_a_conflict() -> None:
    with pytest.raises(Conflict, match=r"'ports\.3000': host port 3000 is already allocated"):
        _allocator().allocate({"3000": 3000}, {3000})


def test_fixed_unbindable_port_is_a_conflict() -> None:
    allocator = _allocator(bindable=lambda port, protocol: port != 3000)
    with pytest.raises(Conflict, match=r"'ports\.3000': host port 3000 is in use on this host"):
        allocator.allocate({"3000": 3000}, set())


def test_fixed_ports_are_checked_before_any_auto_port() -> None:
    calls: list[int] = []

    def bindable(port: int, protocol: str) -> bool:
        calls.append(port)
        return port != 3000

    allocator = _allocator(bindable=bindable)
    cursor = allocator.cursor
    with pytest.raises(Conflict):
        allocator.allocate({"22": None, "3000": 3000}, set())
    assert calls == [3000]
    assert allocator.cursor == cursor


def test_fixed_port_bound_to_its_protocol() -> None:
    seen: list[tuple[int, str]] = []

    def bindable(port: int, protocol: str) -> bool:
        seen.append((port, protocol))
        return True

    _allocator(bindable=bindable).allocate({"53/udp": 5353, "80": 8080}, set())
    assert seen == [(5353, "udp"), (8080, "tcp")]


def test_allocate_refuses_duplicate_fixed_ports_even_unparsed() -> None:
    with pytest.raises(InvalidRequest, match="host port 5000 is asked for twice"):
        _allocator().allocate({"80": 5000, "81": 5000}, set())


def test_allocate_refuses_an_out_of_range_fixed_port() -> None:
    with pytest.raises(InvalidRequest, match=r"'ports\.80'"):
        _allocator().allocate({"80": 70000}, set())


def test_empty_request_gives_nothing_and_keeps_the_cursor() -> None:
    allocator = _allocator(start=40005)
    assert allocator.allocate({}, set()) == {}
    assert allocator.cursor == 40005


@pytest.mark.parametrize("port_range", [(0, 10), (10, 5), (1, 65536)])
def test_bad_port_range_is_refused(port_range: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="port range"):
        PortAllocator(port_range, frozenset(), _always)


def test_parsed_requests_flow_into_the_allocator() -> None:
    requests = parse_port_requests({"8080": "auto", "3000": "3000"}, ssh_enabled=True)
    result = _allocator(40000, 40009).allocate(requests, set())
    assert result == {"8080": 40000, "3000": 3000, "22": 40001}


@pytest.mark.parametrize("port", [1, 22, 80, 81, 443, 1023])
def test_fixed_ports_below_the_fixed_range_are_refused(port: int) -> None:
    allocator = PortAllocator((40000, 40009), frozenset(), lambda p, _: True)
    with pytest.raises(InvalidRequest, match="outside 1024-65535"):
        allocator.allocate({"8080": port}, [])


def test_the_provider_may_open_the_fixed_range() -> None:
    allocator = PortAllocator((40000, 40009), frozenset(), lambda p, _: True, fixed_range=(80, 90))
    assert allocator.allocate({"8080": 80}, []) == {"8080": 80}
    with pytest.raises(InvalidRequest, match="outside 80-90"):
        allocator.allocate({"8080": 1024}, [])
