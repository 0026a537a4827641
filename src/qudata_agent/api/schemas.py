"""The wire format of the agent's own HTTP API (CONTRACT.md section 1).

Owns the pydantic models that requests are validated into and answers are
documented by; `openapi.py` builds /openapi.json from them, so the document
cannot drift from what the code accepts. What stays true: field names here are
the contract's names; extra answer fields are allowed, renamed ones are not.
"""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class Ok(BaseModel, Generic[T]):
    """Every successful answer: `{"ok": true, "data": ...}`."""

    ok: Literal[True] = True
    data: T


class Failure(BaseModel):
    """Every failed answer: `{"ok": false, "error": "<human message>"}`."""

    ok: Literal[False] = False
    error: str = Field(description="What went wrong, written for a person; never holds a secret")


class Empty(BaseModel):
    """A request or answer with no fields."""

    model_config = ConfigDict(extra="forbid")
