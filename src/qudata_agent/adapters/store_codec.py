"""The store's text forms of an instance record and its container spec.

Owns `instance_to_json` / `instance_from_json` (the `instances.record`
column) and `spec_to_json` / `spec_from_json` (the `instances.spec`
column). Only `store.py` calls them: no other module turns a spec or a record
into text or back, so the rest of the agent sees `Instance.spec` as a typed
`ContainerSpec`.

What stays true:
- what is read back equals what was written;
- a key this code does not know is ignored (a field of a newer agent, or the
  `spec_json` string an old record carried before migration 7 moved it to
  its own column);
- neither form holds credentials (neither type has any).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from typing import Any

from qudata_agent.domain.container_spec import ContainerSpec, Mount, PortBinding
from qudata_agent.domain.instance import Instance, Status, Wanted

_INSTANCE_FIELDS = frozenset(f.name for f in fields(Instance)) - {"spec"}


def instance_to_json(instance: Instance) -> str:
    """The record column: every field of the instance but its spec (stored beside it)."""
    record: dict[str, Any] = asdict(replace(instance, spec=None))
    del record["spec"]
    record["gpus"] = list(instance.gpus)
    return json.dumps(record, sort_keys=True)


def instance_from_json(text: str, spec: ContainerSpec | None) -> Instance:
    record = {k: v for k, v in json.loads(text).items() if k in _INSTANCE_FIELDS}
    record["status"] = Status(record["status"])
    record["wanted"] = Wanted(record["wanted"])
    record["gpus"] = tuple(record.get("gpus", ()))
    record["ports"] = {str(k): int(v) for k, v in record.get("ports", {}).items()}
    return Instance(**record, spec=spec)


def spec_to_json(spec: ContainerSpec | None) -> str | None:
    return None if spec is None else json.dumps(asdict(spec), sort_keys=True)


def spec_from_json(text: str | None) -> ContainerSpec | None:
    """The spec column read back; NULL (or an old record's empty `{}`) is no spec."""
    if not text:
        return None
    record: dict[str, Any] = json.loads(text)
    if not record:
        return None
    record["ports"] = tuple(PortBinding(**p) for p in record.get("ports", ()))
    for key in ("command", "gpu_uuids", "cap_add", "security_opt"):
        record[key] = tuple(record.get(key, ()))
    if record.get("entrypoint") is not None:
        record["entrypoint"] = tuple(record["entrypoint"])
    record["mounts"] = tuple(Mount(**m) for m in record.get("mounts", ()))
    record["tmpfs"] = tuple(tuple(t) for t in record.get("tmpfs", ()))
    return ContainerSpec(**record)
