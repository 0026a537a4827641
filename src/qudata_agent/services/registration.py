"""Registration with the control plane: `POST /init`, then `/init/host` when needed.

Owns the identity the agent presents (agent id, port, address, fingerprint,
pid, version) and the decision to (re)send the host inventory. What stays true:
- the agent id is the one in the store, created once for the life of the state
  directory;
- a `secret_key` in the answer replaces the stored secret before anything else
  happens, and from then on goes out with every call;
- the inventory is sent when the control plane does not know the host, asks
  for an emergency re-init, or when its digest differs from the last one sent
  (checked at registration and again by `refresh_inventory`, which the
  inventory loop calls every few minutes); the digest is stored only after
  the control plane accepted the payload.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from qudata_agent import __version__
from qudata_agent.blocking import Blocking
from qudata_agent.domain.inventory import inventory_digest
from qudata_agent.services.credentials import Credentials
from qudata_agent.state_dir import Meta

log = logging.getLogger(__name__)

INVENTORY_DIGEST_KEY = Meta.INVENTORY_DIGEST


class InitAnswerLike(Protocol):
    @property
    def host_exists(self) -> bool: ...

    @property
    def emergency_reinit(self) -> bool: ...

    @property
    def secret_key(self) -> str | None: ...

    @property
    def tunnel(self) -> dict[str, str]: ...


class ControlPlaneClient(Protocol):
    def set_secret(self, secret: str | None) -> None: ...

    async def init(self, payload: dict[str, Any]) -> InitAnswerLike: ...

    async def init_host(self, payload: dict[str, Any]) -> None: ...


class KeyValueStore(Protocol):
    def get(self, key: str) -> str | None: ...

    def set(self, key: str, value: str) -> None: ...


@dataclass(frozen=True)
class Identity:
    agent_id: str
    fingerprint: str
    address: str | None
    tunnel_pubkey: str | None = None  # tunnel mode: this host's WireGuard public key
    tls_pubkey_sha256: str | None = None  # the pin of the port's key; None: TLS off


class Registrar:
    def __init__(
        self,
        control_plane: ControlPlaneClient,
        credentials: Credentials,
        store: KeyValueStore,
        identity: Identity,
        inventory: Callable[[], Awaitable[dict[str, Any]]],
        blocking: Blocking,
    ) -> None:
        self._blocking = blocking
        self._cp = control_plane
        self._credentials = credentials
        self._store = store
        self._identity = identity
        self._inventory = inventory
        self._sent: dict[str, Any] | None = None  # the payload last sent by this process
        self.tunnel_offer: dict[str, str] = {}  # the last answer's data.tunnel
        self._cp.set_secret(credentials.agent_secret())

    def init_payload(self, port: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "agent_id": self._identity.agent_id,
            "agent_port": port,
            "address": self._identity.address,
            "fingerprint": self._identity.fingerprint,
            "pid": os.getpid(),
            "version": __version__,
            "tls_pubkey_sha256": self._identity.tls_pubkey_sha256,
        }
        if self._identity.tunnel_pubkey:
            payload["tunnel_pubkey"] = self._identity.tunnel_pubkey
        return payload

    def move(self, address: str) -> None:
        """The address reported from the next registration on (tunnel mode: the relay's)."""
        self._identity = replace(self._identity, address=address)

    async def register(self, port: int) -> None:
        """One full registration; raises the client's error on any failure."""
        answer = await self._cp.init(self.init_payload(port))
        self.tunnel_offer = dict(answer.tunnel)
        if answer.secret_key:
            await self._blocking.quick(self._credentials.replace_secret, answer.secret_key)
            self._cp.set_secret(answer.secret_key)
        payload = await self._inventory()
        digest = inventory_digest(payload)
        known = await self._blocking.quick(self._store.get, INVENTORY_DIGEST_KEY)
        if answer.host_exists and not answer.emergency_reinit and digest == known:
            log.info("registered; host inventory unchanged")
            return
        await self._send_inventory(payload, digest)
        log.info(
            "registered; host inventory sent",
            extra={
                "host_exists": answer.host_exists,
                "gpu_amount": payload.get("gpu_amount"),
                "gpu_name": payload.get("gpu_name"),
            },
        )

    async def refresh_inventory(self) -> bool:
        """Sends the inventory again when its digest differs from the stored one; True if sent.

        Raises the client's error when the send fails; the stored digest is
        then unchanged, so the next call tries again.
        """
        payload = await self._inventory()
        digest = inventory_digest(payload)
        known = await self._blocking.quick(self._store.get, INVENTORY_DIGEST_KEY)
        if digest == known:
            return False
        previous = self._sent
        await self._send_inventory(payload, digest)
        log.info(
            "host inventory changed; sent again",
            extra={"changed": _changed_fields(previous, payload) if previous else None},
        )
        return True

    async def _send_inventory(self, payload: dict[str, Any], digest: str) -> None:
        await self._cp.init_host(payload)
        await self._blocking.quick(self._store.set, INVENTORY_DIGEST_KEY, digest)
        self._sent = payload


def _changed_fields(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The payload fields that differ, `configuration` ones named as configuration.KEY."""
    changed = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict) and key == "configuration":
            subs = sorted(set(old) | set(new))
            changed += [f"{key}.{sub}" for sub in subs if old.get(sub) != new.get(sub)]
        elif old != new:
            changed.append(key)
    return changed
