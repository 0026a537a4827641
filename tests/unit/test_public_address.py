"""The public address lookups: MockTransport for the decisions, a loopback server for the wire.

Nothing here reaches the internet: the lookup URLs point at httpx.MockTransport
or at a server on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from qudata_agent.adapters.public_address import PublicAddress, parse_address
from qudata_agent.config import DEFAULT_ADDRESS_LOOKUP_URLS, ConfigError, load_settings
from support.ip_service import IpService, dead_url


@pytest.mark.parametrize(
    ("body", "address"),
    [
        (b"198.51.100.7", "198.51.100.7"),
        (b"  198.51.100.7\n", "198.51.100.7"),
        (b"2001:db8::1", None),  # IPv6: the contract wants IPv4
        (b"<html>blocked</html>", None),
        (b"198.51.100.7 198.51.100.8", None),
        (b"", None),
        (b"\xff\xfe", None),
    ],
)
def test_parse_address(body: bytes, address: str | None) -> None:
    assert parse_address(body) == address


def _mock(answers: dict[str, Callable[[], httpx.Response]], asked: list[str]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        return answers[str(request.url)]()

    return httpx.MockTransport(handler)


async def test_the_first_good_answer_wins_in_order() -> None:
    asked: list[str] = []

    def refuse() -> httpx.Response:
        raise httpx.ConnectError("refused")

    transport = _mock(
        {
            "http://a.test/": refuse,
            "http://b.test/": lambda: httpx.Response(503, text="busy"),
            "http://c.test/": lambda: httpx.Response(200, text="not an address"),
            "http://d.test/": lambda: httpx.Response(200, text="203.0.113.9\n"),
            "http://e.test/": lambda: httpx.Response(200, text="203.0.113.10\n"),
        },
        asked,
    )
    urls = [f"http://{host}.test/" for host in "abcde"]
    address = await PublicAddress(urls, transport=transport).lookup()
    assert address == "203.0.113.9"
    assert asked == urls[:4]  # stops at the first good answer


async def test_no_answer_gives_none() -> None:
    asked: list[str] = []
    transport = _mock({"http://a.test/": lambda: httpx.Response(404)}, asked)
    assert await PublicAddress(["http://a.test/"], transport=transport).lookup() is None
    assert await PublicAddress([], transport=transport).lookup() is None
    assert asked == ["http://a.test/"]


async def test_a_redirect_is_not_followed() -> None:
    asked: list[str] = []
    transport = _mock(
        {"http://a.test/": lambda: httpx.Response(302, headers={"Location": "http://x.test/"})},
        asked,
    )
    assert await PublicAddress(["http://a.test/"], transport=transport).lookup() is None
    assert asked == ["http://a.test/"]


async def test_a_long_answer_is_refused() -> None:
    asked: list[str] = []
    transport = _mock({"http://a.test/": lambda: httpx.Response(200, text="1" * 10_000)}, asked)
    assert await PublicAddress(["http://a.test/"], transport=transport).lookup() is None


# the real wire, on loopback


@pytest.fixture
def servers() -> Iterator[list[IpService]]:
    made: list[IpService] = []
    yield made
    for server in made:
        server.close()


async def test_over_the_wire_a_dead_and_a_slow_service_are_passed_over(
    servers: list[IpService],
) -> None:
    slow = IpService(b"192.0.2.1\n", delay_s=2.0)
    good = IpService(b"198.51.100.23\n")
    servers += [slow, good]
    lookup = PublicAddress([dead_url(), slow.url, good.url], timeout_s=0.5)
    assert await lookup.lookup() == "198.51.100.23"
    assert good.paths == ["/ip"]
    assert await lookup.lookup() == "198.51.100.23"  # a second lookup works too


# configuration


def test_the_lookup_urls_default_to_well_known_services() -> None:
    settings = load_settings({})
    assert settings.address_lookup_urls == DEFAULT_ADDRESS_LOOKUP_URLS
    assert all(url.startswith("https://") for url in settings.address_lookup_urls)
    assert settings.inventory_interval_s == 300


def test_the_lookup_urls_are_a_comma_separated_list_or_none() -> None:
    env = {"QUDATA_ADDRESS_LOOKUP_URLS": " http://127.0.0.1:9/ip , https://ip.example/ "}
    assert load_settings(env).address_lookup_urls == ("http://127.0.0.1:9/ip", "https://ip.example")
    assert load_settings({"QUDATA_ADDRESS_LOOKUP_URLS": "none"}).address_lookup_urls == ()
    assert load_settings({"QUDATA_ADDRESS_LOOKUP_URLS": "NONE"}).address_lookup_urls == ()


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("QUDATA_ADDRESS_LOOKUP_URLS", "ftp://ip.example"),
        ("QUDATA_ADDRESS_LOOKUP_URLS", "https://ok.example,nope"),
        ("QUDATA_INVENTORY_INTERVAL", "0"),
        ("QUDATA_INVENTORY_INTERVAL", "soon"),
    ],
)
def test_bad_values_name_the_variable(var: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=var):
        load_settings({var: raw})


def test_the_inventory_interval_is_configurable() -> None:
    assert load_settings({"QUDATA_INVENTORY_INTERVAL": "2.5"}).inventory_interval_s == 2.5
