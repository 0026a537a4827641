"""Containers: create, the lifecycle, inspect, the agent's list, logs and layer size.

What stays true: a container is created from a `ContainerSpec` only (through
`spec.create_kwargs`); removal also removes its anonymous volumes; reads of
what a tenant controls (its logs, its writable layer's size) run on a
connection of their own with a deadline, and keep a bounded number of bytes.
"""

from __future__ import annotations

import time
from typing import Any

from qudata_agent.adapters.docker import answers
from qudata_agent.adapters.docker.client import Connection, DockerError, timed_out
from qudata_agent.adapters.docker.spec import create_kwargs
from qudata_agent.domain.container_spec import LABEL_AGENT, ContainerSpec, ContainerState
from qudata_agent.domain.log_tail import LogTail, TailBuffer
from qudata_agent.errors import AgentError, NotFound

# Docker walks a writable layer to size it; a tenant's million files must not hold a
# thread for longer than this.
_SIZE_TIMEOUT_S = 60.0


class Containers(Connection):
    def create(self, spec: ContainerSpec) -> str:
        """Creates (does not start) the container; its id. A taken name: Conflict."""
        with self._translated(f"create of {spec.name}"):
            container = self._api().containers.create(**create_kwargs(spec))
        return str(container.id)

    def start(self, container_id: str) -> None:
        with self._translated(f"start of container {container_id}"):
            self._api().api.start(container_id)

    def stop(self, container_id: str, timeout_s: int = 10) -> None:
        with self._translated(f"stop of container {container_id}"):
            self._api().api.stop(container_id, timeout=timeout_s)

    def restart(self, container_id: str, timeout_s: int = 10) -> None:
        with self._translated(f"restart of container {container_id}"):
            self._api().api.restart(container_id, timeout=timeout_s)

    def set_cpuset(self, container_id: str, cpus: str) -> None:
        """Moves a container (running or not) onto these CPUs ("0-3,8"); kept across restarts."""
        with self._translated(f"cpuset of container {container_id}"):
            self._api().api.update_container(container_id, cpuset_cpus=cpus)

    def remove(self, container_id: str) -> bool:
        """Force-removes the container and its anonymous volumes; False if already gone."""
        try:
            with self._translated(f"removal of container {container_id}"):
                self._api().api.remove_container(container_id, v=True, force=True)
        except NotFound:
            return False
        return True

    def inspect(self, container_id: str) -> ContainerState:
        """The state of a container, by id or name."""
        with self._translated(f"container {container_id}"):
            attrs: dict[str, Any] = self._api().api.inspect_container(container_id)
        return answers.container_state(attrs)

    def list_managed(self, agent_id: str) -> list[ContainerState]:
        """Every container (running or not) labelled as this agent's."""
        with self._translated("container list"):
            found = self._api().api.containers(
                all=True, filters={"label": f"{LABEL_AGENT}={agent_id}"}
            )
        states = []
        for summary in found:
            try:
                states.append(self.inspect(summary["Id"]))
            except NotFound:
                continue  # removed between the list and the inspect
        return states

    def logs(self, container_id: str, tail: int, max_bytes: int, timeout_s: float) -> LogTail:
        """The last `tail` lines of stdout and stderr together, of which at most the last
        `max_bytes` bytes are kept.

        The tenant writes these bytes: they are streamed on a connection of the
        call's own and only the newest `max_bytes` are held (`TailBuffer`), and
        the read stops after `timeout_s` (closing that connection).
        """
        api = self._own_client(timeout_s)
        kept = TailBuffer(max_bytes)
        deadline = time.monotonic() + timeout_s
        finished = False
        try:
            with self._translated(f"logs of container {container_id}"):
                stream = api.logs(
                    container_id, stdout=True, stderr=True, tail=tail, stream=True, follow=False
                )
                for chunk in stream:
                    kept.add(chunk)
                    if time.monotonic() > deadline:
                        break
                else:
                    finished = True
        except TimeoutError:
            pass  # quiet past the read timeout: what came is what there is
        except AgentError as e:
            if not timed_out(e):
                raise
        finally:
            api.close()
        return LogTail(kept.text(), cut=kept.dropped > 0, complete=finished)

    def writable_layer_bytes(self, container_id: str) -> int:
        """The size of the container's writable layer (`docker ps --size`'s SizeRw).

        Docker walks the layer to count it, and the tenant decides how many
        files are there: the call has a connection of its own that gives up
        after `_SIZE_TIMEOUT_S` (a `DockerError` saying so), so one layer can
        hold one slow thread that long and no longer. `container_id` is an id
        (or its prefix), not a name.
        """
        api = self._own_client(_SIZE_TIMEOUT_S)
        try:
            with self._translated(f"size of container {container_id}"):
                found = api.containers(all=True, size=True, filters={"id": container_id})
        except AgentError as e:
            if timed_out(e):
                raise DockerError(f"measuring container {container_id} timed out") from e
            raise
        finally:
            api.close()
        for summary in found:
            if str(summary.get("Id", "")).startswith(container_id):
                return int(summary.get("SizeRw") or 0)  # Docker leaves a zero out
        raise NotFound(f"no container {container_id}")
