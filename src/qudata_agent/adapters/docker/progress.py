"""The pure half of image pulls: references, credentials and progress, no I/O.

Owns the credentials object
Docker's endpoints want (the reference itself is split by `domain.image_ref`,
the credentials are `domain.registry_credentials`'s), and the tally that turns
Docker's progress messages into a `domain.pull_progress.PullProgress`. The Docker adapter
(`pull.py` and `images.py` beside it) does the talking; this module imports no SDK, so it is
tested without Docker.

What stays true: a password is never part of a message or a log line built
here (`redact` removes it from text that came from elsewhere); progress only
grows while layers are being fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qudata_agent.domain.image_ref import ImageRef
from qudata_agent.domain.pull_progress import PullProgress
from qudata_agent.domain.registry_credentials import RegistryCredentials

# Docker's per-layer progress statuses; the three in `_LAYER_DONE` end a layer.
_LAYER_STATUSES = frozenset(
    {
        "Pulling fs layer",
        "Waiting",
        "Downloading",
        "Verifying Checksum",
        "Download complete",
        "Extracting",
        "Pull complete",
        "Already exists",
    }
)
_LAYER_DONE = frozenset({"Download complete", "Pull complete", "Already exists"})


def auth_config(auth: RegistryCredentials, ref: ImageRef) -> dict[str, str]:
    """The credentials object Docker expects in X-Registry-Auth (before encoding)."""
    return {
        "username": auth.username,
        "password": auth.password,
        "serveraddress": auth.registry or ref.server,
    }


def redact(text: str, auth: RegistryCredentials | None) -> str:
    """`text` with the password removed, should a registry ever echo it back."""
    if auth is not None and auth.password:
        return text.replace(auth.password, "***")
    return text


def stream_error(message: dict[str, Any]) -> str | None:
    """The error a progress message reports, if it reports one."""
    detail = message.get("errorDetail")
    if isinstance(detail, dict) and detail.get("message"):
        return str(detail["message"])
    if message.get("error"):
        return str(message["error"])
    return None


@dataclass
class _Layer:
    done: int = 0
    total: int = 0
    finished: bool = False


def _capped(layer: _Layer) -> int:
    return min(layer.done, layer.total) if layer.total else layer.done


class PullTally:
    """Sums Docker's per-layer progress messages into one `PullProgress`."""

    def __init__(self) -> None:
        self._layers: dict[str, _Layer] = {}
        self._last: PullProgress | None = None

    def feed(self, message: dict[str, Any]) -> PullProgress | None:
        """Takes one message; returns the new progress when it changed, else None."""
        layer_id = message.get("id")
        status = message.get("status")
        detail = message.get("progressDetail") or {}
        if not isinstance(layer_id, str) or status not in _LAYER_STATUSES:
            return None
        layer = self._layers.setdefault(layer_id, _Layer())
        if isinstance(detail, dict):
            # Downloading and Extracting both count the compressed bytes, so
            # taking the maximum never moves progress backwards.
            layer.total = max(layer.total, int(detail.get("total") or 0))
            layer.done = max(layer.done, int(detail.get("current") or 0))
        if status in _LAYER_DONE:
            layer.finished = True
            layer.done = max(layer.done, layer.total)
        progress = self.progress()
        if progress == self._last:
            return None
        self._last = progress
        return progress

    def progress(self) -> PullProgress:
        layers = self._layers.values()
        return PullProgress(
            bytes_done=sum(_capped(layer) for layer in layers),
            bytes_total=sum(layer.total for layer in layers),
            layers_done=sum(1 for layer in layers if layer.finished),
            layers_total=len(self._layers),
        )
