"""Reading a JSON request body into a schema, bounded and strict.

What stays true: at most `limit + 1` bytes are read whatever the client sends
(chunked bodies included); anything that is not a JSON document of the right
shape ends in `InvalidRequest` (400) naming the field, or `PayloadTooLarge`.
"""

from __future__ import annotations

import json
from typing import TypeVar

import falcon.asgi
from pydantic import BaseModel, ValidationError

from qudata_agent.errors import InvalidRequest, PayloadTooLarge

M = TypeVar("M", bound=BaseModel)


async def read_json(req: falcon.asgi.Request, model: type[M], limit: int) -> M:
    content_type = (req.content_type or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise InvalidRequest("Content-Type must be application/json")
    raw = await req.stream.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body over the limit of {limit} bytes")
    if not raw.strip():
        raise InvalidRequest("request body is empty; a JSON object is required")
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InvalidRequest(f"request body is not valid JSON: {_json_reason(e)}") from None
    if not isinstance(document, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return model.model_validate(document)
    except ValidationError as e:
        raise InvalidRequest(describe_validation_error(e)) from None


def _json_reason(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno} column {e.colno}"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return "cannot be decoded"


def describe_validation_error(e: ValidationError, limit: int = 5) -> str:
    """`field 'a.b': message; ...`, without echoing the input values."""
    parts = []
    for item in e.errors(include_input=False, include_url=False)[:limit]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"field '{where}': {item['msg']}")
    more = e.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
