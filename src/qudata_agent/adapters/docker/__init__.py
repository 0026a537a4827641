"""The Docker adapter: the only package that imports `docker` (and `requests`).

`DockerEngine` (engine.py) is the blocking engine, split by job into
modules; `DockerError` is its error for a refusal other than not found
or a conflict.
"""

from qudata_agent.adapters.docker.client import DockerError
from qudata_agent.adapters.docker.engine import DockerEngine
from qudata_agent.adapters.docker.events import EventStream
from qudata_agent.domain.pull_progress import PullProgress

__all__ = ["DockerEngine", "DockerError", "EventStream", "PullProgress"]
