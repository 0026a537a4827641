"""Networks: the agent's bridge network found, made and removed.

What stays true: a network is made only as `domain.network.network_options`
says (its bridge name, no IPv6); a name is matched exactly, never by prefix.
"""

from __future__ import annotations

import logging

from qudata_agent.adapters.docker import answers
from qudata_agent.adapters.docker.client import Connection
from qudata_agent.domain.network import NetworkInfo, network_options

log = logging.getLogger(__name__)


class Networks(Connection):
    def find_network(self, name: str) -> NetworkInfo | None:
        """The network of exactly this name, as Docker describes it."""
        with self._translated(f"network {name}"):
            for network in self._api().api.networks(names=[name]):
                if network.get("Name") == name:
                    return answers.network_info(
                        name, self._api().api.inspect_network(network["Id"])
                    )
        return None

    def create_network(self, name: str, bridge: str, labels: dict[str, str]) -> str:
        """A bridge network as `domain.network.network_options` says; its id."""
        with self._translated(f"network {name}"):
            created = self._api().api.create_network(
                name,
                driver="bridge",
                options=network_options(bridge),
                labels=labels,
                enable_ipv6=False,
                check_duplicate=True,
            )
        log.info("instance network created", extra={"network": name, "bridge": bridge})
        return str(created["Id"])

    def remove_network(self, network_id: str) -> None:
        with self._translated(f"network {network_id}"):
            self._api().api.remove_network(network_id)
