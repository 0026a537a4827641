"""Registry credentials: the one type an order's login travels in, API to Docker adapter.

Owns `RegistryCredentials` (a user name, a password, and optionally the
registry host they are for). The API builds it from the order; the image
service, the pull coordinator and the Docker adapter take it as it is.

What stays true: the password is never part of a repr; a value lives in
memory for the create only (never in the store, the spec or a log line);
`registry` None means the registry host the image reference names.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RegistryCredentials:
    username: str
    password: str = field(repr=False)
    registry: str | None = None  # None: the registry named in the image reference
