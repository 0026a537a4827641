"""Registry hosts: which addresses the host's Docker daemon is never sent to, and the guard."""

from __future__ import annotations

import pytest

from qudata_agent.domain.image_access import RegistryUnreachable
from qudata_agent.domain.image_ref import resolve_image
from qudata_agent.domain.registry_hosts import (
    allowed,
    forbidden_reason,
    host_of,
    parse_allow_list,
)
from qudata_agent.errors import InvalidRequest
from qudata_agent.services.registry_guard import RegistryGuard


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("fd00::1", "private"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
    ],
)
def test_forbidden_reason(address: str, reason: str | None) -> None:
    assert forbidden_reason(address) == reason


def test_the_hosts_own_public_address_is_forbidden() -> None:
    assert forbidden_reason("8.8.8.8", own=("8.8.8.8", "not-an-ip")) == "an address of this host"
    assert forbidden_reason("::ffff:8.8.8.8", own=("8.8.8.8",)) == "an address of this host"


def test_allow_list() -> None:
    allow = parse_allow_list(" 127.0.0.1:5000, Mirror.Local:443 ,,[::1]:5000")
    assert allow == {"127.0.0.1:5000", "mirror.local:443", "[::1]:5000"}
    assert allowed("127.0.0.1:5000", allow)
    assert allowed("MIRROR.local:443", allow)
    assert not allowed("127.0.0.1:5001", allow)
    assert not allowed("localhost:5000", allow)
    assert not allowed("mirror.local", allow)


@pytest.mark.parametrize("raw", ["127.0.0.1", "host:", "host:99999", "a b:1", "http://x:1"])
def test_bad_allow_entries_are_refused(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_allow_list(raw)


def test_host_of() -> None:
    assert host_of("reg.example:5000") == "reg.example"
    assert host_of("reg.example") == "reg.example"
    assert host_of("[::1]:5000") == "::1"


class Resolver:
    def __init__(self, answers: dict[str, tuple[str, ...]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, timeout_s: float) -> tuple[str, ...]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError("no such name")
        return self.answers[host]


def _guard(resolver: Resolver, allow: str = "") -> RegistryGuard:
    return RegistryGuard(
        allow=parse_allow_list(allow),
        resolve=resolver,
        own_addresses=lambda: {"203.0.113.9"},
    )


async def test_the_guard_judges_every_address_a_name_gives() -> None:
    resolver = Resolver(
        {
            "public.example": ("8.8.8.8",),
            "sneaky.example": ("8.8.8.8", "10.0.0.5"),
            "me.example": ("203.0.113.9",),
            "localhost": ("127.0.0.1", "::1"),
            "127.1": ("127.0.0.1",),
        }
    )
    guard = _guard(resolver)
    await guard.check(resolve_image("busybox", None))  # Docker Hub: nothing asked
    assert resolver.asked == []
    await guard.check(resolve_image("public.example/team/app", None))
    for image, word in [
        ("sneaky.example/x", "private"),
        ("me.example/x", "this host"),
        ("localhost:5000/x", "loopback"),
        ("127.1:5000/x", "loopback"),
    ]:
        with pytest.raises(InvalidRequest, match=word) as caught:
            await guard.check(resolve_image(image, None))
        assert "QUDATA_REGISTRY_ALLOW" in caught.value.message
        assert "10.0.0.5" not in caught.value.message  # the resolved address is not told


async def test_an_allowed_registry_is_not_even_resolved() -> None:
    resolver = Resolver({})
    await _guard(resolver, "127.0.0.1:5000").check(resolve_image("127.0.0.1:5000/x", None))
    assert resolver.asked == []
    with pytest.raises(InvalidRequest):
        await _guard(Resolver({"127.0.0.1": ("127.0.0.1",)}), "127.0.0.1:5000").check(
            resolve_image("127.0.0.1:5001/x", None)
        )


async def test_a_name_that_does_not_resolve_is_unreachable() -> None:
    with pytest.raises(RegistryUnreachable, match=r"nowhere\.example"):
        await _guard(Resolver({})).check(resolve_image("nowhere.example/x", None))
