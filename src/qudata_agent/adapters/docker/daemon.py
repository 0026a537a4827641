"""What dockerd says about itself, and a start check of its runtimes.

Owns `docker info` and what is read from it (the data root, kept a minute;
the registered OCI runtimes; the storage driver) and `probe_runtime`, a
throwaway container that shows a runtime can start one.

What stays true: a probe container is removed in every case, and one left by
an agent killed mid-probe is removed by the next probe.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from typing import Any

import docker
import docker.errors

from qudata_agent.adapters.docker import answers
from qudata_agent.adapters.docker.client import Connection, DockerError, timed_out
from qudata_agent.domain.isolation import RuntimeInfo, parse_runtimes
from qudata_agent.domain.storage import StorageInfo
from qudata_agent.errors import AgentError

LABEL_PROBE = "qudata.probe"  # a runtime's start check (services.isolation), no instance
_STALE_PROBE_S = 300
_DATA_ROOT_TTL_S = 60.0


class Daemon(Connection):
    def info(self) -> dict[str, Any]:
        with self._translated("Docker info"):
            info: dict[str, Any] = self._api().info()
        return info

    def data_root(self) -> str:
        """Docker's data root (where images and writable layers live). Read with `docker
        info` at most once a minute: every create's admission asks for it, and `docker
        info` costs dockerd tens of milliseconds (more while it starts containers); the
        path changes only with a restart of dockerd under a new configuration."""
        now = time.monotonic()
        if self._data_root is not None and now - self._data_root[0] < _DATA_ROOT_TTL_S:
            return self._data_root[1]
        root = str(self.info().get("DockerRootDir") or "/var/lib/docker")
        self._data_root = (now, root)
        return root

    def runtimes(self) -> dict[str, RuntimeInfo]:
        """The OCI runtimes Docker has registered (`docker info` .Runtimes)."""
        return parse_runtimes(self.info().get("Runtimes"))

    def probe_runtime(self, runtime: str, image: str, argv: list[str], timeout_s: float) -> str:
        """Runs `argv` in a throwaway container under `runtime` (no network); its output.

        Raises `DockerError` when the container does not start, exits non-zero
        or outlives `timeout_s`; the container is removed in every case.
        """
        name = f"qudata-probe-{runtime}-{os.getpid()}-{threading.get_ident()}"
        api = self._own_client(timeout_s)
        try:
            with self._translated(f"a container under the {runtime} runtime"):
                self._remove_stale_probes(api)
                host = api.create_host_config(runtime=runtime, network_mode="none")
                created = api.create_container(
                    image, argv, name=name, host_config=host, labels={LABEL_PROBE: "1"}
                )
                api.start(created["Id"])
                ended = api.wait(created["Id"], timeout=math.ceil(timeout_s))
                code = int(ended.get("StatusCode", -1))
                out = bytes(api.logs(created["Id"], stdout=True, stderr=True, tail=20))
        except AgentError as e:
            if timed_out(e):
                raise DockerError(f"no answer within {timeout_s:g} s") from e
            raise
        finally:
            with contextlib.suppress(Exception):
                api.remove_container(name, force=True)
            api.close()
        text = out.decode("utf-8", errors="replace").strip()
        if code != 0:
            raise DockerError(f"the probe exited {code}: {text[-300:]}")
        return text

    @staticmethod
    def _remove_stale_probes(api: docker.APIClient) -> None:
        """Probe containers left by an agent killed mid-probe (older than any probe runs)."""
        cutoff = time.time() - _STALE_PROBE_S
        for found in api.containers(all=True, filters={"label": LABEL_PROBE}):
            if float(found.get("Created") or 0) < cutoff:
                with contextlib.suppress(docker.errors.APIError):
                    api.remove_container(found["Id"], force=True)

    def storage_info(self) -> StorageInfo:
        """The storage driver, its backing filesystem (overlay2's) and the data root."""
        return answers.storage_info(self.info())
