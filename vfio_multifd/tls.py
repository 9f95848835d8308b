"""TLS on the migration channels, as QEMU does it: x509 credential directories,
peer verification, and an allowlist of certificate subjects.

QEMU protects migration channels with a ``tls-creds-x509`` object: a
directory holding ``ca-cert.pem`` and the endpoint's certificate and key in
PEM (``server-cert.pem`` / ``server-key.pem`` on the destination, with an
optional ``ca-crl.pem``; ``client-cert.pem`` / ``client-key.pem`` on the
source), ``verify-peer`` (on by default: the client must present a
certificate from the CA) and ``tls-authz`` (an ``authz-simple`` identity: the
client certificate's distinguished name, compared as a string). This module
reads the same directories and does the same checks.

* :func:`load_server` / :func:`load_client` read a credential directory once,
  at startup, and check it as QEMU's "sanity check" does: every required file
  readable, each a PEM certificate (or key, or CRL), the key the certificate's
  own, and the certificate valid against ``ca-cert.pem`` now. Anything wrong is
  a :class:`UsageError` naming the file (exit 2).
* ``tls_channel.py`` runs one incoming channel's TLS session with the server
  context made here (and says why not the loops' own TLS).
* :func:`subject_dn` formats a certificate's subject the way QEMU's authz
  check sees it (``gnutls_x509_crt_get_dn``): see its docstring.

The 64-byte channel handshake's timer (``--handshake-timeout``) starts when
the connection is accepted, so it covers the TLS handshake too.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import structlog

from .config import Address, TlsSettings
from .errors import HandshakeError, Reason, UsageError

log = structlog.get_logger("vfio_multifd.tls")

# QEMU's file names (crypto/tlscredsx509.h).
CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

#: Ciphertext read from the socket at a time, into one buffer all channels share.
RECEIVE_SIZE = 256 << 10
#: Ciphertext held while the channel does not read (it waits for memory): past
#: this, the socket is not read either and TCP pushes back on the source.
MAX_PENDING_CIPHERTEXT = 256 << 10


# -- distinguished names ----------------------------------------------------------

#: Python's attribute names (OpenSSL's long names) -> the names gnutls prints.
_GNUTLS_NAMES = {
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "street",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "commonName": "CN",
    "title": "title",
    "description": "description",
    "serialNumber": "serialNumber",
    "telephoneNumber": "telephoneNumber",
    "surname": "surName",
    "givenName": "givenName",
    "initials": "initials",
    "generationQualifier": "generationQualifier",
    "dnQualifier": "dnQualifier",
    "pseudonym": "pseudonym",
    "postalCode": "postalCode",
    "name": "name",
    "businessCategory": "businessCategory",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "EMAIL",
    "jurisdictionLocalityName": "jurisdictionOfIncorporationLocalityName",
    "jurisdictionStateOrProvinceName": "jurisdictionOfIncorporationStateOrProvinceName",
    "jurisdictionCountryName": "jurisdictionOfIncorporationCountryName",
    "1.2.840.113556.1.4.656": "userPrincipalName",
    "id-pda-placeOfBirth": "placeOfBirth",
    "id-pda-gender": "gender",
    "id-pda-countryOfCitizenship": "countryOfCitizenship",
    "id-pda-countryOfResidence": "countryOfResidence",
    "XmppAddr": "XmppAddr",
}
_SPECIAL = frozenset(',+"\\<>;')

RDN = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    """RFC 4514 escaping, as gnutls does it: a backslash before ``,+"\\<>;``,
    before a leading ``#`` or space, and before a trailing space."""
    out = []
    last = len(value) - 1
    for n, char in enumerate(value):
        if char in _SPECIAL or (n == 0 and char in "# ") or (n == last and char == " "):
            out.append("\\")
        out.append(char)
    return "".join(out)


def subject_dn(subject: Iterable[RDN]) -> str:
    """A certificate subject (``getpeercert()["subject"]``) as QEMU's authz compares it.

    QEMU's check (``crypto/tlssession.c``) takes the peer certificate's DN from
    ``gnutls_x509_crt_get_dn``, which prints it in gnutls's compatibility
    format: the relative distinguished names **in the order the certificate
    encodes them** (not reversed as RFC 4514 would), each ``TYPE=value`` with
    gnutls's attribute names (``C``, ``ST``, ``L``, ``O``, ``OU``, ``CN``,
    ``DC``, ``UID``, ``EMAIL``, ``street``, ...), values escaped as RFC 4514
    says, joined by ``,`` without spaces (the parts of a multi-valued RDN by
    ``+``). So a certificate made by ``certtool`` from QEMU's documented
    template reads ``CN=host,O=Example Org,L=London,ST=London,C=GB`` and one
    made by ``openssl req -subj /C=GB/O=Example/CN=host`` reads
    ``C=GB,O=Example,CN=host``. Known difference: an attribute gnutls has no
    name for is printed here as ``OID=value`` (gnutls prints ``OID=#hex`` of
    its DER encoding).
    """
    return ",".join(
        "+".join(f"{_GNUTLS_NAMES.get(name, name)}={_escape(value)}" for name, value in rdn)
        for rdn in subject
    )


def peer_subject(sslobj: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The verified peer certificate's subject (:func:`subject_dn`), if there is one."""
    cert = sslobj.getpeercert()
    if not cert or "subject" not in cert:
        return None
    return subject_dn(cast(Iterable[RDN], cert["subject"]))


# -- credential directories --------------------------------------------------------


def _readable(directory: Path, name: str, *, required: bool = True) -> Path | None:
    """``directory/name`` if it can be read; None if it is absent and not required."""
    path = directory / name
    try:
        with open(path, "rb") as file:
            file.read(1)
    except FileNotFoundError:
        if not required:
            return None
        raise UsageError(
            f"--tls-creds {directory}: {path} is missing (QEMU's x509 credential layout)"
        ) from None
    except OSError as error:
        raise UsageError(
            f"--tls-creds {directory}: cannot read {path}: {error.strerror or error}"
        ) from None
    return path


def _check_pem(path: Path, what: str) -> None:
    """``path`` holds at least one ``what`` ('certificate' or 'CRL') in PEM."""
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        scratch.load_verify_locations(cafile=path)
    except ssl.SSLError as error:
        raise UsageError(f"{path}: not a PEM {what} ({error.reason or error})") from None
    stats = scratch.cert_store_stats()
    if not stats["crl" if what == "CRL" else "x509"]:
        raise UsageError(f"{path}: not a PEM {what}")


def _no_password() -> str:
    raise _EncryptedKey


class _EncryptedKey(Exception):
    pass


def _load_pair(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Certificate and key into ``context``; a key that is not the certificate's is named."""
    _check_pem(cert, "certificate")
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise UsageError(
            f"{key}: the key is encrypted; give an unencrypted key (QEMU's passwordid "
            "is not supported)"
        ) from None
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise UsageError(f"{key}: the key does not match its certificate {cert}") from None
        raise UsageError(f"{key}: not a PEM private key ({error.reason or error})") from None


def _handshake_in_memory(
    client: ssl.SSLObject, server: ssl.SSLObject, pipes: list[ssl.MemoryBIO]
) -> None:
    """Run a handshake between two in-memory endpoints; raises what either raises."""
    to_server, to_client, client_out, server_out = pipes
    for _ in range(8):
        done = 0
        for endpoint in (client, server):
            try:
                endpoint.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        to_server.write(client_out.read())
        to_client.write(server_out.read())
        if done == 2:
            return
    raise ssl.SSLError("the in-memory handshake did not finish")


def _check_against_ca(cert: Path, key: Path, ca: Path, *, server: bool) -> None:
    """QEMU's sanity check: our own certificate validates against ``ca-cert.pem`` now.

    Decided by an in-memory handshake in which the peer verifies it, as the real
    peer will (chain, validity period, key usage for its purpose)."""
    holder = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    verifier = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if server else ssl.PROTOCOL_TLS_SERVER)
    for context in (holder, verifier):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    holder.load_cert_chain(cert, key)
    if not server:
        holder.check_hostname = False
        holder.verify_mode = ssl.CERT_NONE
        verifier.load_cert_chain(cert, key)  # any certificate will do for the verifier's side
    verifier.check_hostname = False
    verifier.verify_mode = ssl.CERT_REQUIRED
    verifier.load_verify_locations(cafile=ca)
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    to_server, to_client, client_out, server_out = pipes
    client_context, server_context = (verifier, holder) if server else (holder, verifier)
    client = client_context.wrap_bio(to_client, client_out, server_side=False)
    endpoint = server_context.wrap_bio(to_server, server_out, server_side=True)
    try:
        _handshake_in_memory(client, endpoint, pipes)
    except ssl.SSLCertVerificationError as error:
        raise UsageError(
            f"{cert}: not valid against {ca}: {error.verify_message or error.reason}"
        ) from None
    except ssl.SSLError as error:
        raise UsageError(f"{cert}: not usable with {ca}: {error.reason or error}") from None


def _base_context(protocol: int) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


@dataclass(frozen=True, slots=True)
class TlsServer:
    """A loaded server credential directory: the context each channel's session comes from."""

    context: ssl.SSLContext
    verify_peer: bool
    authz: frozenset[str]
    creds_dir: Path
    crl: bool  # ca-crl.pem was loaded
    #: Where every channel's ciphertext is read (``tls_channel.py``). One is enough: a
    #: loop calls ``get_buffer`` and ``buffer_updated`` back to back, and the bytes are
    #: copied into the channel's own BIO at once; so an accepted socket costs no buffer
    #: before it sends a byte (issue 20: 256 KiB each, 500 silent strangers 130 MiB).
    receive_buffer: memoryview = field(
        default_factory=lambda: memoryview(bytearray(RECEIVE_SIZE)), repr=False, compare=False
    )

    def check_peer(self, sslobj: ssl.SSLObject) -> str | None:
        """The peer's subject once the handshake verified it; raises :class:`HandshakeError`
        when ``--tls-authz`` does not list it."""
        subject = peer_subject(sslobj) if self.verify_peer else None
        if self.authz and subject not in self.authz:
            raise HandshakeError(
                Reason.TLS,
                f"client certificate subject {subject!r} is not in --tls-authz "
                "(compared as gnutls prints it: RDNs in certificate order)",
            )
        return subject


def load_server(settings: TlsSettings) -> TlsServer:
    """Read and check a server credential directory (QEMU's ``endpoint=server``)."""
    directory = settings.creds_dir
    if not directory.is_dir():
        raise UsageError(f"--tls-creds {directory}: not a directory")
    ca = _readable(directory, CA_CERT)
    cert = _readable(directory, SERVER_CERT)
    key = _readable(directory, SERVER_KEY)
    crl = _readable(directory, CA_CRL, required=False)
    assert ca is not None and cert is not None and key is not None
    _check_pem(ca, "certificate")
    context = _base_context(ssl.PROTOCOL_TLS_SERVER)
    context.num_tickets = 0  # no resumption: every channel is verified by a full handshake
    _load_pair(context, cert, key)
    _check_against_ca(cert, key, ca, server=True)
    if settings.verify_peer:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=ca)
        if crl is not None:
            _check_pem(crl, "CRL")
            context.load_verify_locations(cafile=crl)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    else:
        context.verify_mode = ssl.CERT_NONE
        log.warning(
            "tls_verify_peer_off",
            creds=str(directory),
            message="--tls-verify-peer no: any client that completes TLS may send device "
            "state; clients are neither asked for nor checked against a certificate",
        )
    return TlsServer(
        context=context,
        verify_peer=settings.verify_peer,
        authz=frozenset(settings.authz),
        creds_dir=directory,
        crl=crl is not None and settings.verify_peer,
    )


@dataclass(frozen=True, slots=True)
class TlsClient:
    """A loaded client credential directory and the name the server must prove."""

    context: ssl.SSLContext
    hostname: str

    def wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        """The TLS handshake on a connected blocking socket (the server verified by name).

        A read that meets the end of the stream without the server's ``close_notify``
        raises :class:`ssl.SSLEOFError` rather than look like a clean end."""
        return self.context.wrap_socket(
            sock, server_hostname=self.hostname, suppress_ragged_eofs=False
        )


def load_client(creds_dir: Path, address: Address, hostname: str | None = None) -> TlsClient:
    """Read and check a client credential directory (QEMU's ``endpoint=client``).

    The server's certificate is verified against ``hostname``: by default the host
    of a ``tcp:`` address; a ``unix:`` address has none, so it must be given (as
    QEMU's ``tls-hostname`` must be for a unix socket)."""
    if hostname is None:
        if address.kind == "unix":
            raise UsageError(
                f"--connect {address} with --tls-creds needs --tls-hostname NAME: a unix "
                "socket has no host name to verify the receiver's certificate against"
            )
        hostname = address.host
    if not creds_dir.is_dir():
        raise UsageError(f"--tls-creds {creds_dir}: not a directory")
    ca = _readable(creds_dir, CA_CERT)
    assert ca is not None
    _check_pem(ca, "certificate")
    # As QEMU: the client's own certificate is optional, but not half of it.
    cert = _readable(creds_dir, CLIENT_CERT, required=False)
    key = _readable(creds_dir, CLIENT_KEY, required=cert is not None)
    if key is not None and cert is None:
        _readable(creds_dir, CLIENT_CERT)  # raises: missing, named
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.load_verify_locations(cafile=ca)
    if cert is not None and key is not None:
        _load_pair(context, cert, key)
        _check_against_ca(cert, key, ca, server=False)
    else:
        log.warning(
            "tls_no_client_certificate",
            creds=str(creds_dir),
            message=f"no {CLIENT_CERT}: a receiver that verifies its peers refuses this source",
        )
    return TlsClient(context, hostname)
