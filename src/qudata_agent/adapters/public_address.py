"""The host's public IPv4 address, as "what is my IP" services on the internet see it.

Owns the outbound lookups to those services (the second of the two modules
allowed to import httpx; the control-plane client is the other). What stays
true:
- each URL is asked once, in order, within a short timeout for the whole call,
  over IPv4 only; the first answer that is one IPv4 address (plain text, at
  most a few bytes) wins;
- a failure, a slow service, a redirect or an answer that is not an IPv4
  address just moves on to the next URL; `lookup` never raises, it returns
  None when no service answered, and the caller falls back to the
  default-route address;
- nothing but the address is read from the answer (the body is capped).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence

import httpx

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3.0
_MAX_BODY = 64  # "255.255.255.255\n" with room for whitespace


def parse_address(body: bytes) -> str | None:
    """The IPv4 address a lookup service answered with; None for anything else."""
    try:
        text = body.decode("ascii").strip()
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return str(address) if address.version == 4 else None


class PublicAddress:
    """Asks the configured lookup services, in order, for this host's public IPv4."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        user_agent: str = "qudata-agent",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._urls = tuple(urls)
        self._timeout_s = timeout_s
        self._user_agent = user_agent
        self._transport = transport

    async def lookup(self) -> str | None:
        if not self._urls:
            return None
        # Bound to 0.0.0.0 so the services answer with the IPv4 address, not an IPv6 one;
        # a fresh transport per lookup, since the client closes it on the way out.
        transport = self._transport or httpx.AsyncHTTPTransport(local_address="0.0.0.0")
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(self._timeout_s),
            headers={"User-Agent": self._user_agent, "Accept": "text/plain"},
            transport=transport,
            follow_redirects=False,
        ) as client:
            for url in self._urls:
                try:
                    async with asyncio.timeout(self._timeout_s):  # the whole call, body included
                        address = await self._ask(client, url)
                except TimeoutError:
                    log.debug("address lookup timed out", extra={"url": url})
                    address = None
                if address is not None:
                    log.info("public address found", extra={"address": address, "source": url})
                    return address
        log.warning(
            "no public address lookup answered; using the default-route address",
            extra={"tried": len(self._urls)},
        )
        return None

    async def _ask(self, client: httpx.AsyncClient, url: str) -> str | None:
        try:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    log.debug(
                        "address lookup refused", extra={"url": url, "status": resp.status_code}
                    )
                    return None
                body = b""
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_BODY:
                        log.debug("address lookup answer too long", extra={"url": url})
                        return None
        except httpx.HTTPError as e:
            log.debug("address lookup failed", extra={"url": url, "error": type(e).__name__})
            return None
        address = parse_address(body)
        if address is None:
            log.debug("address lookup answered no IPv4 address", extra={"url": url})
        return address
