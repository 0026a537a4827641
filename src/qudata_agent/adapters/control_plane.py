"""Client of the QuData control plane (httpx is imported here and, for the public
address lookups, in adapters/public_address.py only).

Owns the outbound wire calls of CONTRACT.md section 2 and their headers:
`X-Api-Key` on every call, `X-Agent-Secret` once a secret is known. What stays
true: a call either returns the parsed `data` of the answer or raises
`ControlPlaneError` (never an httpx exception, never a message holding a
header value); retries are the caller's policy, not hidden in here; every
failed call is reported once to `on_failure` (the metrics) with its path, and
every successful one to `on_success`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from qudata_agent.domain.tunnel import from_answer

log = logging.getLogger(__name__)


class ControlPlaneError(Exception):
    """A call failed. `status` is the HTTP code when there was an answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InitAnswer:
    agent_created: bool
    emergency_reinit: bool
    host_exists: bool
    secret_key: str | None
    tunnel: dict[str, str] = field(default_factory=dict)  # data.tunnel (tunnel mode)


class ControlPlane:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 10.0,
        user_agent: str = "qudata-agent",
        transport: httpx.AsyncBaseTransport | None = None,
        on_failure: Callable[[str], None] | None = None,
        on_success: Callable[[str], None] | None = None,
    ) -> None:
        self._api_key = api_key
        self._on_failure = on_failure
        self._on_success = on_success
        self._secret: str | None = None
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            timeout=httpx.Timeout(timeout_s),
            headers={"User-Agent": user_agent},
            transport=transport,
            follow_redirects=False,
        )

    def set_secret(self, secret: str | None) -> None:
        self._secret = secret

    def _headers(self) -> dict[str, str]:
        headers = {"X-Api-Key": self._api_key}
        if self._secret:
            headers["X-Agent-Secret"] = self._secret
        return headers

    async def _post(self, path: str, payload: dict[str, Any]) -> Any:
        try:
            data = await self._call(path, payload)
        except ControlPlaneError:
            if self._on_failure is not None:
                self._on_failure(path)
            raise
        if self._on_success is not None:
            self._on_success(path)
        return data

    async def _call(self, path: str, payload: dict[str, Any]) -> Any:
        try:
            resp = await self._client.post(path.lstrip("/"), json=payload, headers=self._headers())
        except httpx.TimeoutException as e:
            raise ControlPlaneError(f"POST {path}: timed out") from e
        except httpx.HTTPError as e:
            raise ControlPlaneError(f"POST {path}: {type(e).__name__}") from e
        if resp.status_code >= 400:
            raise ControlPlaneError(
                f"POST {path}: HTTP {resp.status_code} {self._echo(_error_text(resp))}",
                resp.status_code,
            )
        try:
            body = resp.json()
        except ValueError as e:
            raise ControlPlaneError(f"POST {path}: answer is not JSON", resp.status_code) from e
        if isinstance(body, dict) and body.get("ok") is False:
            raise ControlPlaneError(f"POST {path}: refused: {self._echo(body.get('error'))}")
        if isinstance(body, dict) and "data" in body:
            return body["data"]
        return body

    def _echo(self, value: object) -> str:
        """The server's own text, shortened, with any credential it echoed back masked."""
        text = str(value) if value is not None else ""
        for credential in (self._api_key, self._secret):
            if credential:
                text = text.replace(credential, "***")
        return _short(text)

    async def init(self, payload: dict[str, Any]) -> InitAnswer:
        data = await self._post("/init", payload)
        if not isinstance(data, dict):
            raise ControlPlaneError("POST /init: answer has no data object")
        secret = data.get("secret_key")
        return InitAnswer(
            agent_created=bool(data.get("agent_created")),
            emergency_reinit=bool(data.get("emergency_reinit")),
            host_exists=bool(data.get("host_exists")),
            secret_key=secret if isinstance(secret, str) and secret else None,
            tunnel=from_answer(data.get("tunnel")),
        )

    async def init_host(self, payload: dict[str, Any]) -> None:
        await self._post("/init/host", payload)

    async def stats(self, payload: dict[str, Any]) -> None:
        await self._post("/stats", payload)

    async def check(self) -> tuple[int, str | None]:
        """An authenticated `GET` of the base URL (for `doctor`): its status and Date header.

        Any HTTP answer is returned (a 401 or 403 says the key is refused);
        only no answer at all raises `ControlPlaneError`.
        """
        try:
            resp = await self._client.get("", headers=self._headers())
        except httpx.TimeoutException as e:
            raise ControlPlaneError("GET: timed out") from e
        except httpx.HTTPError as e:
            raise ControlPlaneError(f"GET: {type(e).__name__}: {self._echo(e)}") from e
        return resp.status_code, resp.headers.get("date")

    async def aclose(self) -> None:
        await self._client.aclose()


def _short(value: object, limit: int = 200) -> str:
    text = str(value) if value is not None else ""
    return text if len(text) <= limit else text[:limit] + "..."


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return ""
    if isinstance(body, dict):
        return str(body.get("error") or body.get("detail") or "")
    return ""
