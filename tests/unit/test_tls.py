"""TLS on the port: the routing by first byte, the pin, the names, renewal; the key files."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from qudata_agent.adapters.tls import (
    AgentCertificate,
    TlsError,
    TlsKeeper,
    provider_identity,
    served_identity,
)
from qudata_agent.domain.tls import (
    RENEW_BEFORE,
    Route,
    TlsMode,
    certificate_names,
    peeks,
    pin,
    renewal_reason,
    route,
)
from support.tls_certs import issue, spki_pin

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("mode", "client_ca", "first", "expected"),
    [
        (TlsMode.ON, False, 0x16, Route.TLS),
        (TlsMode.ON, False, ord("G"), Route.PLAIN),
        (TlsMode.ON, True, ord("G"), Route.REFUSE_PLAIN),  # mutual TLS: plain HTTP is off
        (TlsMode.REQUIRED, False, ord("P"), Route.REFUSE_PLAIN),
        (TlsMode.REQUIRED, False, 0x16, Route.TLS),
        (TlsMode.OFF, False, 0x16, Route.PLAIN),
    ],
)
def test_a_connection_is_routed_by_its_first_byte(
    mode: TlsMode, client_ca: bool, first: int, expected: Route
) -> None:
    assert route(mode, client_ca, first) is expected


def test_only_mode_off_skips_the_first_byte() -> None:
    assert [peeks(m) for m in TlsMode] == [True, True, False]


def test_the_pin_is_curls_pinnedpubkey_value() -> None:
    der = b"any SubjectPublicKeyInfo bytes"
    assert pin(der) == base64.b64encode(hashlib.sha256(der).digest()).decode()


def test_certificate_names_are_unique_in_order_without_blanks() -> None:
    assert certificate_names("Host-1", None, "", "203.0.113.9", "host-1", "[2001:db8::1]") == (
        "host-1",
        "203.0.113.9",
        "2001:db8::1",
    )


def test_renewal_is_due_before_expiry_or_for_a_new_name() -> None:
    later = NOW + RENEW_BEFORE + dt.timedelta(days=1)
    assert renewal_reason(None, (), ("a",), NOW) == "no certificate yet"
    assert renewal_reason(later, ("a",), ("a",), NOW) is None
    assert renewal_reason(NOW + dt.timedelta(days=2), ("a",), ("a",), NOW) == "expires soon"
    assert renewal_reason(NOW - dt.timedelta(days=1), ("a",), ("a",), NOW) == "expired"
    assert renewal_reason(later, ("a",), ("a", "b"), NOW) == "new names: b"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_agent_made_key_is_private_and_outlives_renewals(tmp_path: Path) -> None:
    made = AgentCertificate(tmp_path)
    first = made.ensure(("host-1", "203.0.113.9"), NOW)
    assert _mode(tmp_path / "tls/key.pem") == 0o600 and _mode(tmp_path / "tls") == 0o700
    assert first.names == ("host-1", "203.0.113.9")
    assert made.ensure(("host-1",), NOW) == first  # nothing due: the same certificate
    near = first.not_after - RENEW_BEFORE + dt.timedelta(hours=1)
    renewed = made.ensure(("host-1",), near)
    assert renewed.pin == first.pin and renewed.not_after > first.not_after
    assert renewed.names == first.names  # names are kept, never dropped
    cert = x509.load_pem_x509_certificate((tmp_path / "tls/cert.pem").read_bytes())
    assert spki_pin(cert) == first.pin
    assert served_identity(tmp_path, None, None) == renewed


def test_a_new_name_makes_the_certificate_again_with_the_same_key(tmp_path: Path) -> None:
    keeper = TlsKeeper(tmp_path, ("host-1",))
    before = keeper.identity
    assert keeper.renew("host-1") is False
    assert keeper.renew("198.51.100.4") is True
    assert keeper.identity.pin == before.pin
    assert keeper.identity.names == ("host-1", "198.51.100.4")


def test_an_unreadable_key_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir(mode=0o700)
    (tmp_path / "tls/key.pem").write_text("not a key")
    with pytest.raises(TlsError, match=r"key\.pem"):
        AgentCertificate(tmp_path).ensure(("h",), NOW)


def test_the_providers_certificate_must_match_its_key(tmp_path: Path) -> None:
    cert_file, key_file = issue(None, "p", server=True, names=("p.test",)).write(tmp_path, "p")
    _, other_key = issue(None, "q", server=True).write(tmp_path, "q")
    identity = provider_identity(cert_file, key_file)
    assert identity.names == ("p.test",) and not identity.agent_made
    with pytest.raises(TlsError, match="is not the key of the certificate"):
        provider_identity(cert_file, other_key)
    assert served_identity(tmp_path, cert_file, key_file) == identity
    assert served_identity(tmp_path / "none", None, None) is None


def test_the_server_context_speaks_tls12_and_up_and_asks_for_client_certs(
    tmp_path: Path,
) -> None:
    ca_file, _ = issue(None, "ca", server=False).write(tmp_path, "ca")
    keeper = TlsKeeper(tmp_path, ("h",), client_ca=ca_file)
    assert keeper.context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert keeper.context.verify_mode is ssl.CERT_REQUIRED
    assert TlsKeeper(tmp_path, ("h",)).context.verify_mode is ssl.CERT_NONE


def _served_by(ctx: ssl.SSLContext) -> x509.Certificate:
    """The certificate a handshake with `ctx` presents (over a socket pair, in memory)."""
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    left, right = socket.socketpair()
    with left, right:
        server = threading.Thread(target=lambda: ctx.wrap_socket(right, server_side=True))
        server.start()
        with client_ctx.wrap_socket(left) as tls:
            der = tls.getpeercert(binary_form=True)
        server.join(5)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_a_renewal_is_served_by_the_live_context_with_the_same_pin(tmp_path: Path) -> None:
    keeper = TlsKeeper(tmp_path, ("host-1",))
    before = _served_by(keeper.context)
    due = keeper.identity.not_after - RENEW_BEFORE + dt.timedelta(hours=1)
    assert keeper.renew(now=due) is True
    after = _served_by(keeper.context)
    assert after.serial_number != before.serial_number
    assert after.not_valid_after_utc == keeper.identity.not_after > before.not_valid_after_utc
    assert spki_pin(after) == spki_pin(before) == keeper.identity.pin


def test_a_providers_certificate_is_never_renewed_by_the_agent(tmp_path: Path) -> None:
    own = issue(None, "p", server=True, valid_for=dt.timedelta(days=1)).write(tmp_path, "p")
    keeper = TlsKeeper(tmp_path, ("h",), own)
    assert keeper.renew("198.51.100.4") is False
    assert _served_by(keeper.context).serial_number == keeper_serial(own[0])


def keeper_serial(cert_file: Path) -> int:
    return x509.load_pem_x509_certificate(cert_file.read_bytes()).serial_number
