"""The agent's exception tree and the one table that maps it to HTTP codes.

    AgentError              500  (generic message to the client, details in the log)
    +-- InvalidRequest      400  bad input; nothing was changed
    +-- Unauthorized        401  missing or wrong X-Agent-Secret
    +-- NotFound            404
    +-- Conflict            409  illegal transition, already exists, nothing free
    +-- PayloadTooLarge     413
    +-- Unavailable         503  Docker, NVML or the state store is down

What stays true: a message is safe to show to the caller. It never holds a
secret, a key or a password; adapters build it from what they know, never by
echoing an SDK's text that might carry credentials.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(AgentError):
    pass


class Unauthorized(AgentError):
    pass


class NotFound(AgentError):
    pass


class Conflict(AgentError):
    pass


class PayloadTooLarge(AgentError):
    pass


class Unavailable(AgentError):
    pass


HTTP_STATUS: dict[type[AgentError], int] = {
    InvalidRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    Unavailable: 503,
}


def http_status(error: AgentError) -> int:
    """The HTTP code for an AgentError: the closest class in the table, else 500."""
    for cls in type(error).__mro__:
        code = HTTP_STATUS.get(cls)
        if code is not None:
            return code
    return 500
