"""Doctor's judgments of the agent's two links: the control plane and the API port's TLS.

Pure functions from the control plane's answer (status, Date header) and the
port's certificate and plain-HTTP answer to a `Check`. What stays true: no
secret is ever part of a detail.
"""

from __future__ import annotations

import datetime as dt
from email.utils import parsedate_to_datetime

from qudata_agent.adapters.tls import TlsIdentity
from qudata_agent.doctor.model import CLOCK_FAIL_S, CLOCK_WARN_S, Check, CpAnswer, Level
from qudata_agent.domain.tls import RENEW_BEFORE, TlsMode


def control_plane_check(url: str, has_key: bool, answer: CpAnswer | str | None) -> Check:
    """`answer`: the answer to an authenticated call through the agent's client, or why none."""
    if not has_key:
        return Check(
            "control plane",
            Level.WARN,
            "no API key: standalone mode, the host is not offered for rent",
            "install.sh --api-key-file FILE (the key goes to the state dir's api_key)",
        )
    if not isinstance(answer, CpAnswer):
        return Check(
            "control plane",
            Level.FAIL,
            f"{url} unreachable: {answer or 'no answer'}",
            "allow outbound HTTPS to it (DNS, firewall, HTTPS_PROXY), or fix QUDATA_API_URL",
        )
    if answer.status in (401, 403):
        return Check(
            "control plane",
            Level.FAIL,
            f"{url} refuses the API key (HTTP {answer.status})",
            "give the right key: install.sh --api-key-file FILE",
        )
    detail = f"{url} answers an authenticated call (HTTP {answer.status})"
    skew = clock_skew_s(answer)
    if skew is None:
        return Check("control plane", Level.PASS, detail + "; no Date header: clock not compared")
    detail += f"; clock skew {skew:+.0f} s"
    if abs(skew) > CLOCK_FAIL_S:
        level = Level.FAIL
    elif abs(skew) > CLOCK_WARN_S:
        level = Level.WARN
    else:
        return Check("control plane", Level.PASS, detail)
    return Check("control plane", level, detail, "synchronise the clock: timedatectl set-ntp true")


def clock_skew_s(answer: CpAnswer) -> float | None:
    """Local clock minus the control plane's (whole seconds: what Date carries)."""
    if not answer.date:
        return None
    try:
        return answer.at - parsedate_to_datetime(answer.date).timestamp()
    except (TypeError, ValueError):
        return None


def tls_check(
    mode: TlsMode,
    identity: TlsIdentity | None,
    error: str | None,
    plain: int | None,
    now: dt.datetime,
) -> Check:
    """The agent's port: TLS on?, the pin, the certificate's expiry, does plain HTTP answer.

    `plain`: the HTTP status a plain `GET /ping` on the agent's port got (None: no
    answer, the agent is not running).
    """
    name = "api tls"
    if mode is TlsMode.OFF:
        return Check(
            name,
            Level.WARN,
            "TLS off (QUDATA_TLS=off): the secret crosses the network in clear",
            "unset QUDATA_TLS (on: TLS beside plain HTTP), then move the control plane to "
            "https:// with the pin, then QUDATA_TLS=required (install.sh --tls required)",
        )
    if error is not None:
        return Check(
            name,
            Level.FAIL,
            error,
            "fix QUDATA_TLS_CERT_FILE/QUDATA_TLS_KEY_FILE, or unset them (the agent makes its own)",
        )
    if identity is None:
        return Check(name, Level.PASS, f"{mode}; the key and certificate are made at first start")
    detail = f"{mode}, pin sha256//{identity.pin}, certificate until {identity.not_after:%Y-%m-%d}"
    detail += " (agent-made)" if identity.agent_made else " (the provider's)"
    if plain is None:
        detail += "; port not probed: the agent does not answer"
    elif plain == 400:
        detail += "; plain HTTP refused"
    else:
        detail += "; plain HTTP answers too"
    left = identity.not_after - now
    if not identity.agent_made and left <= RENEW_BEFORE:
        expired = left.total_seconds() <= 0
        return Check(
            name,
            Level.FAIL if expired else Level.WARN,
            detail + ("; EXPIRED" if expired else f"; expires in {left.days} days"),
            "put a renewed certificate in QUDATA_TLS_CERT_FILE (same key keeps the pin) and "
            "restart the agent",
        )
    if mode is TlsMode.ON and plain is not None and plain != 400:
        return Check(
            name,
            Level.PASS,
            detail,
            "once the control plane calls https:// with the pin: QUDATA_TLS=required",
        )
    return Check(name, Level.PASS, detail)
