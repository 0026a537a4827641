"""The registry guard: the host's Docker daemon is sent only to registries on the internet.

Owns `RegistryGuard.check`, called by the image service before any call that
makes dockerd contact a registry (a tag check or a pull), and by the create
path before anything is recorded (so an order naming such a host gets 400
with nothing created and nothing contacted).

What stays true:
- a reference with no registry host (Docker Hub) passes; one whose
  `host:port` the provider listed in `QUDATA_REGISTRY_ALLOW` passes;
- any other registry host is resolved once, within a bounded time, and is
  refused (`InvalidRequest`) when any address it stands for is loopback,
  link-local, private, reserved or one of the host's own
  (`domain.registry_hosts`), whether it was written as an address or a name;
- the refusal names the host and the kind of address, never the address a
  name resolved to (the provider's internal DNS is not a tenant's oracle);
- a name that cannot be resolved in time is `RegistryUnreachable` (the
  daemon is not asked either): a public cached image still runs from the
  cache, a pull fails;
- DNS rebinding: the daemon resolves the name again when it connects; a
  name that answered public here and answers private to the daemon is not
  caught (see docs/security.md for what bounds that).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection

from qudata_agent.domain.image_access import RegistryUnreachable
from qudata_agent.domain.image_ref import ImageRef
from qudata_agent.domain.registry_hosts import allowed, forbidden_reason, host_of
from qudata_agent.errors import InvalidRequest

log = logging.getLogger(__name__)

Resolver = Callable[[str, float], Awaitable[tuple[str, ...]]]
DEFAULT_RESOLVE_TIMEOUT_S = 3.0


class RegistryGuard:
    def __init__(
        self,
        *,
        allow: Collection[str],
        resolve: Resolver,
        own_addresses: Callable[[], Collection[str]],
        public_address: str | None = None,
        timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S,
    ) -> None:
        self._allow = frozenset(allow)
        self._resolve = resolve
        self._own_addresses = own_addresses
        self._public_address = public_address
        self._timeout_s = timeout_s

    async def check(self, ref: ImageRef) -> None:
        """Returns when dockerd may contact `ref`'s registry; raises saying why not."""
        registry = ref.registry
        if registry is None or allowed(registry, self._allow):
            return
        host = host_of(registry)
        try:
            addresses = await self._resolve(host, self._timeout_s)
        except Exception as e:  # the resolver's own error type stays in its adapter
            raise RegistryUnreachable(f"registry host {registry}: {e}") from None
        own = set(self._own_addresses())
        if self._public_address:
            own.add(self._public_address)
        for address in addresses:
            reason = forbidden_reason(address, own)
            if reason is not None:
                log.warning(
                    "order refused: its registry host is not on the internet",
                    extra={"registry": registry, "address": address, "why": reason},
                )
                raise InvalidRequest(
                    f"field 'image': registry host {registry} is {reason}; the"
                    " agent does not send Docker there unless the provider lists it in"
                    " QUDATA_REGISTRY_ALLOW"
                )
