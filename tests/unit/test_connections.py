"""The connection table: the cap, who makes room, and who is never evicted."""

from __future__ import annotations

import pytest

from qudata_agent.domain.connections import ConnectionTable


def test_below_the_cap_everyone_comes_in() -> None:
    table = ConnectionTable(3)
    admitted = [table.admit(float(n)) for n in range(3)]
    assert all(a.conn is not None and a.evicted is None for a in admitted)
    assert len(table) == 3


def test_over_the_cap_the_oldest_stranger_makes_room() -> None:
    table = ConnectionTable(2)
    first, second = table.admit(0.0).conn, table.admit(1.0).conn
    third = table.admit(2.0)
    assert third.conn is not None and third.evicted is first
    assert len(table) == 2
    assert not table.holds(first) and table.holds(second)  # type: ignore[arg-type]


def test_trusted_and_busy_connections_are_never_evicted() -> None:
    table = ConnectionTable(3)
    trusted, busy, waiting = (table.admit(float(n)).conn for n in range(3))
    assert trusted is not None and busy is not None
    trusted.trusted = True
    busy.in_request = True
    admission = table.admit(3.0)
    assert admission.evicted is waiting
    busy.in_request = False  # its response went out: a stranger again, and the oldest one
    assert table.admit(4.0).evicted is busy


def test_a_newcomer_is_refused_when_no_one_can_make_room() -> None:
    table = ConnectionTable(2)
    for _ in range(2):
        conn = table.admit(0.0).conn
        assert conn is not None
        conn.trusted = True
    refused = table.admit(1.0)
    assert refused.conn is None and refused.evicted is None
    assert len(table) == 2 and table.counts() == (0, 2)


def test_closing_is_safe_to_repeat_and_frees_the_slot() -> None:
    table = ConnectionTable(1)
    conn = table.admit(0.0).conn
    assert conn is not None
    table.close(conn)
    table.close(conn)
    assert len(table) == 0
    assert table.admit(1.0).evicted is None


def test_the_cap_is_at_least_one() -> None:
    with pytest.raises(ValueError):
        ConnectionTable(0)
