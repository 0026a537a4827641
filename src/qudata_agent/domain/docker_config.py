"""Settings merged into Docker's daemon.json: which keys are set, every other kept.

The installer registers live-restore, the pull settings and gVisor's runtime
this way (`qudata-agent docker-config merge`). What stays true: a key named is
set to exactly the value given, a key not named keeps its value, a dotted key
(`runtimes.runsc`) reaches into nested objects and creates the missing ones;
a file that is not one JSON object is refused, never overwritten; the text
written is canonical (sorted keys, two-space indent), so a file already
holding the values compares equal and is left as it is.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

Assignment = tuple[tuple[str, ...], Any]  # a key path and its value


class DockerConfigError(ValueError):
    """daemon.json or an assignment cannot be used; the message says which and why."""


def parse_assignment(text: str) -> Assignment:
    """`KEY=JSON`, e.g. `live-restore=true` or `runtimes.runsc={"path": "/usr/bin/runsc"}`."""
    key, eq, raw = text.partition("=")
    path = tuple(key.split("."))
    if not eq or not all(path):
        raise DockerConfigError(f"{text!r}: expected KEY=JSON (KEY may be dotted: a.b)")
    try:
        return path, json.loads(raw)
    except ValueError as e:
        raise DockerConfigError(f"{key}: the value is not JSON ({e.args[0]})") from e


def parse_config(text: str, name: str) -> dict[str, Any]:
    """daemon.json's text as an object; an empty or blank file is an empty object."""
    try:
        config = json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise DockerConfigError(f"{name} is not valid JSON ({e.args[0]})") from e
    if not isinstance(config, dict):
        raise DockerConfigError(f"{name} is not a JSON object")
    return config


def merged(config: dict[str, Any], assignments: Sequence[Assignment]) -> dict[str, Any]:
    """`config` with each assignment made (a new object; `config` is not changed)."""
    result = copy.deepcopy(config)
    for path, value in assignments:
        node = result
        for i, key in enumerate(path[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise DockerConfigError(
                    f"{where} is not a JSON object: cannot set {'.'.join(path)}"
                )
            node = child
        node[path[-1]] = copy.deepcopy(value)
    return result


def render(config: dict[str, Any]) -> str:
    """The canonical text of daemon.json (with its final newline)."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
