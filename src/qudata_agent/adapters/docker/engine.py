"""The Docker engine, through the official SDK: its parts put together.

`DockerEngine` is the blocking engine: each method runs in the caller's
thread (async code reaches it through the ports in `ports.py`, which pick
the pool). Its parts live in their own modules (`client` for the connection
and the errors, `daemon`, `containers`, `images`, `pull`, `events`,
`networks`); they share one `client.Connection`.

What stays true: no module outside this package sees a docker or requests
type; a registry password is never part of a message or a log line.
"""

from __future__ import annotations

from qudata_agent.adapters.docker.containers import Containers
from qudata_agent.adapters.docker.daemon import Daemon
from qudata_agent.adapters.docker.events import Events
from qudata_agent.adapters.docker.networks import Networks
from qudata_agent.adapters.docker.pull import Pulls


class DockerEngine(Daemon, Containers, Pulls, Events, Networks):
    """Every part of the engine over one connection (`Connection.__init__`'s arguments)."""
