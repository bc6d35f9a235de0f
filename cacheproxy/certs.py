"""The local certificate authority of TLS interception (``cacheproxy ca init``, ``tls_intercept``).

:func:`create_ca` writes a CA certificate and its key (mode 0600). :class:`Authority` loads them and
hands out a server-side :class:`ssl.SSLContext` per host, with a leaf certificate for that host
(DNS or IP subjectAltName) signed by the CA. One EC key serves every leaf of a process; each
host's certificate is made once and kept (``LEAVES`` hosts, least recently used go first).
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import os
import socket
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_YEARS = 10
LEAF_DAYS = 397  # the longest validity clients accept for a server certificate
LEAVES = 1000
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"


class AuthorityError(Exception):
    """The CA files cannot be used (missing, unreadable, not a CA, key does not match)."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    """Digital signatures; and certificate and CRL signing for the CA."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_ca(out: Path, common_name: str | None = None, force: bool = False) -> tuple[Path, Path]:
    """Write ``ca.pem`` and ``ca.key`` (0600) into ``out``; refuse to overwrite unless ``force``."""
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / CA_CERT_FILE, out / CA_KEY_FILE
    if not force:
        for path in (cert_path, key_path):
            if path.exists():
                raise FileExistsError(f"{path} exists (use --force to replace it)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"cacheproxy CA ({socket.gethostname()})"[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cacheproxy"),
        ]
    )
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = _pem(key)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # also when the file was there before
        f.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class Authority:
    """Signs leaf certificates with the configured CA and keeps a TLS context per host."""

    def __init__(self, cert_path: Path, key_path: Path) -> None:
        try:
            self._cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise AuthorityError(f"tls_intercept.ca_cert: cannot load {cert_path}: {exc}") from None
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise AuthorityError(f"tls_intercept.ca_key: cannot load {key_path}: {exc}") from None
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise AuthorityError(f"tls_intercept.ca_key: {key_path}: only EC and RSA keys are supported")
        if key.public_key().public_numbers() != self._cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise AuthorityError(f"tls_intercept.ca_key: {key_path} is not the key of {cert_path}")
        try:
            constraints = self._cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise AuthorityError(f"tls_intercept.ca_cert: {cert_path} is not a CA certificate")
        self._key = key
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._contexts: collections.OrderedDict[str, ssl.SSLContext] = collections.OrderedDict()
        self._dir = tempfile.TemporaryDirectory(prefix="cacheproxy-leaf-")  # 0700; files live a moment

    def close(self) -> None:
        self._dir.cleanup()

    def context_for(self, host: str) -> ssl.SSLContext:
        host = host.lower()
        context = self._contexts.get(host)
        if context is None:
            context = self._contexts[host] = self._new_context(host)
            while len(self._contexts) > LEAVES:
                self._contexts.popitem(last=False)
        else:
            self._contexts.move_to_end(host)
        return context

    def leaf_for(self, host: str) -> x509.Certificate:
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            ip = None
        san: x509.GeneralName = x509.IPAddress(ip) if ip is not None else x509.DNSName(host)
        now = _now()
        public = self._leaf_key.public_key()
        try:
            ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            authority = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
        except x509.ExtensionNotFound:
            authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(self._cert.public_key())  # type: ignore[arg-type]
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self._cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(min(now + datetime.timedelta(days=LEAF_DAYS), self._cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(signs_certificates=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(authority, critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def _new_context(self, host: str) -> ssl.SSLContext:
        cert = self.leaf_for(host).public_bytes(serialization.Encoding.PEM)
        key = _pem(self._leaf_key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        # The ssl module loads certificates from files only: write, load, remove at once.
        fd, path = tempfile.mkstemp(suffix=".pem", dir=self._dir.name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(cert + key)
            context.load_cert_chain(path)
        finally:
            os.unlink(path)
        return context
