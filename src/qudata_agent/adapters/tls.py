"""The TLS key and certificate of the agent's port, and the server's SSL context.

Owns `<state>/tls/` (key.pem, mode 0600, and cert.pem), the provider's own
certificate when one is configured, and the `ssl.SSLContext` the listener
serves with. With adapters/ssh_files.py (the instances' SSH host keys) the
only module that imports `cryptography`.

What stays true:
- the agent-made key (ECDSA P-256) is made once for the life of the state
  directory; the certificate (self-signed, the host's names in it) is made
  again before it expires, or when a name is missing, always with that key,
  so the pin never changes;
- a provider's certificate is served as given; its key must match it, or the
  start fails with a message naming the files;
- renewing swaps the certificate into the live context: connections made
  after it see the new one, none is dropped;
- TLS 1.2 and 1.3 only; with a client CA only clients with a certificate from
  it complete the handshake.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qudata_agent.adapters.secrets import SecretFile, ensure_private_dir
from qudata_agent.domain.tls import VALIDITY, certificate_names, is_ip, pin, renewal_reason
from qudata_agent.state_dir import StateDir

log = logging.getLogger(__name__)


class TlsError(Exception):
    """A key or certificate cannot be read, made or used; the message names the file."""


@dataclass(frozen=True)
class TlsIdentity:
    """What the port serves: the files, the pin, the expiry and the names."""

    cert_file: Path
    key_file: Path
    pin: str
    not_after: dt.datetime
    names: tuple[str, ...]
    agent_made: bool


def _spki_pin(cert: x509.Certificate) -> str:
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pin(der)


def _names_of(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return certificate_names(*dns, *ips)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise TlsError(f"{path}: not a readable PEM certificate ({e})") from e


def identity_of(cert_file: Path, key_file: Path, agent_made: bool = False) -> TlsIdentity:
    """The pin, expiry and names of a certificate file (no key is read)."""
    cert = _load_cert(cert_file)
    return TlsIdentity(
        cert_file,
        key_file,
        _spki_pin(cert),
        cert.not_valid_after_utc,
        _names_of(cert),
        agent_made,
    )


def pin_of_der(cert_der: bytes) -> str:
    """The pin of a DER certificate (as a TLS peer presents it)."""
    return _spki_pin(x509.load_der_x509_certificate(cert_der))


def served_identity(
    state_dir: Path, cert_file: Path | None, key_file: Path | None
) -> TlsIdentity | None:
    """What the port serves, as the files say (the provider's, else the agent-made; None: none yet).

    Reads only: for `status` and `doctor`, which never make a key.
    """
    if cert_file is not None and key_file is not None:
        return identity_of(cert_file, key_file)
    layout = StateDir(state_dir)
    made = layout.tls_cert
    if not made.exists():
        return None
    return identity_of(made, layout.tls_key, agent_made=True)


def provider_identity(cert_file: Path, key_file: Path) -> TlsIdentity:
    """The provider's own certificate and key, checked to belong together."""
    cert = _load_cert(cert_file)
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise TlsError(f"{key_file}: not a readable, unencrypted PEM private key ({e})") from e
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise TlsError(f"{key_file} is not the key of the certificate in {cert_file}")
    return identity_of(cert_file, key_file)


class AgentCertificate:
    """The agent-made key and certificate in `<state>/tls/`."""

    def __init__(self, state_dir: Path) -> None:
        layout = StateDir(state_dir)
        self.folder = layout.tls_dir
        self._key = SecretFile(layout.tls_key)
        self._cert = SecretFile(layout.tls_cert)

    def _private_key(self) -> ec.EllipticCurvePrivateKey:
        text = self._key.read()
        if text is not None:
            try:
                key = serialization.load_pem_private_key(text.encode(), password=None)
            except ValueError as e:
                raise TlsError(f"{self._key.path}: not a readable PEM private key") from e
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise TlsError(f"{self._key.path}: not an EC key")
            return key
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._key.write(pem.decode())
        log.info("TLS key made", extra={"path": str(self._key.path)})
        return key

    def ensure(self, names: tuple[str, ...], now: dt.datetime | None = None) -> TlsIdentity:
        """The key and a certificate good for a while yet, made or remade as needed."""
        now = now or dt.datetime.now(dt.UTC)
        ensure_private_dir(self.folder)
        key = self._private_key()
        held: TlsIdentity | None = None
        if self._cert.path.exists():
            try:
                held = identity_of(self._cert.path, self._key.path, agent_made=True)
            except TlsError as e:
                log.warning("TLS certificate unreadable; made again", extra={"error": str(e)})
        reason = renewal_reason(
            held.not_after if held else None, held.names if held else (), names, now
        )
        if held is not None and reason is None and self._matches(key, held):
            return held
        wanted = certificate_names(*(held.names if held and reason != "expired" else ()), *names)
        self._cert.write(_self_signed(key, wanted, now).decode())
        made = identity_of(self._cert.path, self._key.path, agent_made=True)
        log.info(
            "TLS certificate made",
            extra={"reason": reason or "another key", "names": list(made.names), "pin": made.pin},
        )
        return made

    @staticmethod
    def _matches(key: ec.EllipticCurvePrivateKey, held: TlsIdentity) -> bool:
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pin(der) == held.pin


def _self_signed(
    key: ec.EllipticCurvePrivateKey, names: tuple[str, ...], now: dt.datetime
) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "qudata")])
    alt: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(n)) if is_ip(n) else x509.DNSName(n) for n in names
    ]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    )
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


def server_context(identity: TlsIdentity, client_ca: Path | None) -> ssl.SSLContext:
    """TLS 1.2+ server context with the identity's chain, and the client CA when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_chain(ctx, identity)
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as e:
            raise TlsError(f"{client_ca}: not a readable PEM CA certificate ({e})") from e
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def load_chain(ctx: ssl.SSLContext, identity: TlsIdentity) -> None:
    """Puts the identity's certificate and key into `ctx` (new handshakes use them)."""
    try:
        ctx.load_cert_chain(str(identity.cert_file), str(identity.key_file))
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"{identity.cert_file}: cannot be served ({e})") from e


class TlsKeeper:
    """The port's live TLS: the context it serves, the identity in it, and its renewal."""

    def __init__(
        self,
        state_dir: Path,
        names: tuple[str, ...],
        own: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
    ) -> None:
        self._agent = None if own else AgentCertificate(state_dir)
        self._names = names
        if own is not None:
            identity = provider_identity(*own)
        else:
            assert self._agent is not None
            identity = self._agent.ensure(names)
        self.identity = identity
        self.context = server_context(identity, client_ca)

    def renew(self, *names: str | None, now: dt.datetime | None = None) -> bool:
        """Makes the agent-made certificate again when due (or a name is new); True if it did.

        A provider's certificate is never touched (its expiry is the provider's).
        """
        if self._agent is None:
            return False
        self._names = certificate_names(*self._names, *names)
        identity = self._agent.ensure(self._names, now)
        if identity == self.identity:
            return False
        load_chain(self.context, identity)
        self.identity = identity
        return True
