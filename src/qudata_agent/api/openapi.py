"""Builds the OpenAPI 3.1 document from the route table and the pydantic models.

What stays true: every operation in `routes.ROUTES` appears, with its request
model, its answer wrapped in the envelope, the error envelope for each error
code it can give, and the `X-Agent-Secret` requirement unless it is public.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from qudata_agent.api.routes import Operation, Route
from qudata_agent.api.schemas import Failure, Ok

_REF = "#/components/schemas/{model}"
_COMMON_ERRORS = {
    400: "Malformed request (bad JSON, wrong content type, invalid field)",
    401: "Missing or wrong X-Agent-Secret",
    404: "No such route",
    405: "Method not allowed on this route",
    413: "Request body over the size limit",
    500: "Internal error (details only in the agent's log)",
}


def _answer_model(op: Operation) -> type[BaseModel] | None:
    if op.raw:
        return None
    return Ok[op.response] if op.response is not None else Ok[None]  # type: ignore[name-defined]


def _models(routes: tuple[Route, ...]) -> list[type[BaseModel]]:
    models: list[type[BaseModel]] = [Failure]
    for route in routes:
        for op in route.operations:
            for model in (op.request, _answer_model(op)):
                if model is not None and model not in models:
                    models.append(model)
    return models


def _operation(route: Route, op: Operation, refs: dict[type[BaseModel], Any]) -> dict[str, Any]:
    error_ref = refs[Failure]
    answer = _answer_model(op)
    plain = {"type": "object"} if op.media == "application/json" else {"type": "string"}
    content: dict[str, Any] = {"schema": refs[answer] if answer else plain}
    responses: dict[str, Any] = {
        str(op.status): {"description": "Success", "content": {op.media: content}}
    }
    codes = {400, 404, 405, 500} | set(op.errors)
    if not op.public:
        codes.add(401)
    if op.request is not None:
        codes.add(413)
    for code in sorted(codes):
        responses[str(code)] = {
            "description": _COMMON_ERRORS.get(code, "Refused"),
            "content": {"application/json": {"schema": error_ref}},
        }
    doc: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", route.path),
        "responses": responses,
        "security": [] if op.public else [{"agentSecret": []}],
    }
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", route.path)
    ] + [
        {"name": q.name, "in": "query", "required": False, "schema": q.schema}
        | ({"description": q.description} if q.description else {})
        for q in op.query
    ]
    if parameters:
        doc["parameters"] = parameters
    if op.request is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[op.request]}},
        }
    return doc


def build_openapi(routes: tuple[Route, ...], version: str) -> dict[str, Any]:
    models = _models(routes)
    keys, top = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    refs = {m: keys[(m, "validation")] for m in models}
    paths: dict[str, Any] = {}
    for route in routes:
        paths[route.path] = {
            op.method.lower(): _operation(route, op, refs) for op in route.operations
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "QuData host agent", "version": version},
        "paths": paths,
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {
                "agentSecret": {"type": "apiKey", "in": "header", "name": "X-Agent-Secret"}
            },
        },
    }
