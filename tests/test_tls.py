"""TLS channels (issue 12): QEMU's x509 credential directories, peer verification,
the authz allowlist, and every way a connection can fail TLS.

Certificates are made at test time (``benchmarks/credentials.py``, on trustme);
every async test runs under asyncio and uvloop (conftest) over real sockets, and
fails if anything reaches the loop's exception handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import select
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import qemu_source as qs
import structlog
from cli_helpers import Daemon, digests, one_device_daemon, receive_usage_error, run
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from helpers import IDSTR, Running, assert_outputs, random_bytes, settings, start

from credentials import Authority, client_subject
from vfio_multifd import (
    Address,
    Cancelled,
    DeviceKey,
    HandshakeError,
    ProtocolError,
    Reason,
    ReceiveSettings,
)
from vfio_multifd.config import TlsSettings
from vfio_multifd.daemon.channel import ChannelState
from vfio_multifd.ops.status_server import query_migrate
from vfio_multifd.source.plan import SourceDevice
from vfio_multifd.source.sender import SendResult, send
from vfio_multifd.tls import load_client, load_server, subject_dn

A = DeviceKey(IDSTR, 0)
DATA = random_bytes(5 * 4096 + 99, 12)
CFG = b"tls config"
SUBJECT = client_subject()  # O=Example,OU=migration,CN=source.example.com
NOW = datetime.datetime.now(datetime.UTC)


class Creds:
    """One CA's server and client directories, and strangers' credentials."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.authority = Authority()
        self.server = self.authority.server_dir(root / "server")
        self.client = self.authority.client_dir(root / "client")

    def client_context(self, client_dir: Path | None = None) -> ssl.SSLContext:
        """A client context that trusts our CA and presents ``client_dir``'s certificate."""
        context = ssl.create_default_context(cafile=self.server / "ca-cert.pem")
        if client_dir is not None:
            context.load_cert_chain(client_dir / "client-cert.pem", client_dir / "client-key.pem")
        return context


@pytest.fixture
def creds(short_dir: Path) -> Creds:
    return Creds(short_dir / "creds")


def tls_settings(
    tmp_path: Path, creds: Creds, channels: int = 2, **extra: object
) -> ReceiveSettings:
    tls = extra.pop("tls", TlsSettings(creds.server, authz=(SUBJECT,)))
    return settings(tmp_path, A, channels=channels, tls=tls, **extra)


def raw_connect(address: str) -> socket.socket:
    parsed = Address.parse(address)
    if parsed.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(parsed.path)
    else:
        sock = socket.create_connection((parsed.host, parsed.port))
    sock.settimeout(10)
    return sock


def hostname_of(address: str) -> str:
    parsed = Address.parse(address)
    return "localhost" if parsed.kind == "unix" else parsed.host


def stray(address: str, context: ssl.SSLContext | None, payload: bytes = qs.handshake(0)) -> None:
    """A client that fails TLS somewhere: plaintext (no context), or TLS with ``context``;
    it sends ``payload`` if it gets that far and reads until the daemon hangs up."""
    with contextlib.suppress(OSError), raw_connect(address) as raw:
        sock: socket.socket = raw
        if context is not None:
            sock = context.wrap_socket(raw, server_hostname=hostname_of(address))
        sock.sendall(payload)
        while sock.recv(4096):
            pass


async def refused(running: Running, count: int = 1) -> list[HandshakeError]:
    session = running.session
    for _ in range(500):
        if len(session.core.connections.refused) >= count:
            break
        await asyncio.sleep(0.01)
    return [error for _, error in session.core.connections.refused]


def send_tls(address: str, client_dir: Path, source: Path, channels: int = 2) -> SendResult:
    parsed = Address.parse(address)
    client = load_client(client_dir, parsed, "localhost" if parsed.kind == "unix" else None)
    device = SourceDevice(A, source=source, size=source.stat().st_size)
    return send(parsed, [device], channels=channels, chunk_size=4096, tls=client)


# -- success -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_tls_channels_deliver_exactly_the_bytes_sent(
    tmp_path: Path, short_dir: Path, creds: Creds, kind: str
) -> None:
    listen = Address("unix", path=str(short_dir / "m.sock")) if kind == "unix" else None
    config = tls_settings(tmp_path, creds, channels=3, listen=listen)
    source = tmp_path / "source.bin"
    source.write_bytes(random_bytes(300_001, 7))
    running = await start(config)
    sent = await asyncio.to_thread(send_tls, running.address, creds.client, source, 3)
    result = await running.result()
    assert config.devices[0].data_path.read_bytes() == source.read_bytes()
    assert result.devices[0].digest == sent.devices[0][3]
    assert result.tls_subjects == {0: SUBJECT, 1: SUBJECT, 2: SUBJECT}
    assert result.tls_summary() == f"tls: 3 channels; client subject {SUBJECT} (channels 0, 1, 2)"
    info = query_migrate(running.session.snapshot(time.monotonic()))
    assert info["tls"] is True and info["refused-connections"] == 0
    assert [c["tls-subject"] for c in info["channels"]] == [SUBJECT] * 3


async def test_close_notify_then_fin_at_once_loses_nothing(tmp_path: Path, creds: Creds) -> None:
    """QEMU ends a TLS channel with gnutls_bye(SHUT_WR) and closes: the last records,
    close_notify and the FIN arrive together. Both loops' own TLS transports lose data
    here (see tls.py); this daemon must not."""
    data = random_bytes(2 << 20, 3)
    streams = qs.build_streams([(IDSTR, 0, data, CFG)], 2, chunk_size=1024)
    config = tls_settings(tmp_path, creds)
    running = await start(config)
    context = creds.client_context(creds.client)

    def qemu_like(stream: bytes) -> None:
        channel = BioClient(running.address, context)
        tail = 300_000  # hundreds of small packets, then close_notify and FIN in one go
        channel.write(stream[:-tail])
        channel.write(stream[-tail:], flush=False)
        channel.close_notify()
        channel.fin()
        channel.wait_closed()

    await asyncio.gather(*(asyncio.to_thread(qemu_like, s) for s in streams))
    await running.result()
    assert_outputs(config, [(data, qs.config_blob(CFG))])


class BioClient:
    """A TLS client on a memory BIO: full control of what goes on the wire, and when."""

    def __init__(self, address: str, context: ssl.SSLContext) -> None:
        self.sock = raw_connect(address)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_hostname=hostname_of(address)
        )
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self.incoming.write(self.sock.recv(65536) or b"")
        self.sock.sendall(self.outgoing.read())

    def write(self, data: bytes, *, flush: bool = True) -> None:
        view = memoryview(data)
        for start_at in range(0, len(view), 1 << 16):
            self.tls.write(view[start_at : start_at + (1 << 16)])
            if flush:
                self.sock.sendall(self.outgoing.read())

    def close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        self.sock.sendall(self.outgoing.read())

    def fin(self) -> None:
        self.sock.sendall(self.outgoing.read())
        self.sock.shutdown(socket.SHUT_WR)

    def wait_closed(self) -> None:
        with contextlib.suppress(OSError):
            while self.sock.recv(65536):
                pass
        self.sock.close()

    def answer(self) -> str:
        """How the daemon ended this channel: ``close_notify, FIN``, ``FIN`` (without
        close_notify) or ``reset``; it sends no data."""
        notified = False
        try:
            while data := self.sock.recv(65536):
                self.incoming.write(data)
                try:
                    assert self.tls.read(65536) == b"", "the daemon sent data"
                    notified = True  # b"": its close_notify
                except ssl.SSLZeroReturnError:  # its close_notify, once we sent ours
                    notified = True
                except ssl.SSLWantReadError:
                    pass
        except ConnectionResetError:
            return "reset"
        finally:
            self.sock.close()
        return "close_notify, FIN" if notified else "FIN"

    def readable(self) -> bool:
        """The daemon sent something (or hung up) on this channel, so far."""
        return bool(select.select([self.sock], [], [], 0)[0])


@pytest.mark.parametrize("where", ["at a packet boundary", "inside a packet"])
async def test_a_close_without_close_notify_is_never_a_clean_end(
    tmp_path: Path, creds: Creds, where: str
) -> None:
    packet = qs.device_packet(IDSTR, 0, 0, DATA)
    stream = qs.handshake(0) + (packet if where == "at a packet boundary" else packet[:500])
    config = tls_settings(tmp_path, creds, channels=1)
    running = await start(config)

    def cut() -> str:
        channel = BioClient(running.address, creds.client_context(creds.client))
        channel.write(stream)
        channel.fin()  # a FIN with no close_notify before it
        return channel.answer()

    # As over plaintext, a failed channel is reset (it was answered with a FIN).
    assert await asyncio.to_thread(cut) == "reset"
    with pytest.raises(ProtocolError) as failure:
        await running.result()
    assert failure.value.reason is Reason.PACKET_TRUNCATED
    if where == "inside a packet":
        assert failure.value.idx == 0 and "stream closed inside state buffer 0" in str(
            failure.value
        )
    else:
        assert "without TLS close_notify" in str(failure.value)
    assert not list(tmp_path.glob("*.part")) and not config.devices[0].data_path.exists()


async def test_a_silent_connection_costs_no_receive_buffer(tmp_path: Path, creds: Creds) -> None:
    """Each accepted socket took a 256 KiB buffer before any TLS byte came (issue 20:
    500 silent strangers raised the daemon's peak RSS by 130 MiB): they share one now.
    What the connections cost is traced, not timed."""
    config = tls_settings(tmp_path, creds)
    running = await start(config)
    count = 40
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        socks = [raw_connect(running.address) for _ in range(count)]
        for _ in range(500):
            if len(running.session.core.connections.pending) == count:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"{len(running.session.core.connections.pending)} of {count} accepted")
        per_connection = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    for sock in socks:
        sock.close()
    running.session.cancel("the test is over")
    with pytest.raises(Cancelled):
        await running.result()
    assert per_connection < 16 << 10, f"{per_connection / 1024:.0f} KiB per silent connection"


@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_close_notify_is_answered_only_with_the_verdict(
    tmp_path: Path, creds: Creds, outcome: str
) -> None:
    """A channel that ended with close_notify hears nothing until the migration's
    outcome is decided: then close_notify and a FIN if it completed, a reset if not.
    (The daemon answered at once: a source took that for success, issue 20.)"""
    streams = qs.build_streams([(IDSTR, 0, DATA, CFG)], 2, chunk_size=4096)
    config = tls_settings(tmp_path, creds)
    running = await start(config)
    context = creds.client_context(creds.client)
    first = await asyncio.to_thread(BioClient, running.address, context)
    await asyncio.to_thread(first.write, streams[0])
    await asyncio.to_thread(first.close_notify)
    for _ in range(500):
        channel = running.session.core.connections.channels.get(0)
        if channel is not None and channel.state is ChannelState.CLOSED:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("channel 0's close_notify did not end it")
    assert not first.readable()  # the outcome is not known yet: no answer
    second = await asyncio.to_thread(BioClient, running.address, context)
    if outcome == "completed":
        await asyncio.to_thread(second.write, streams[1])
        await asyncio.to_thread(second.close_notify)
    else:
        await asyncio.to_thread(second.write, qs.handshake(1) + b"\x12\x34\x56\x78" + bytes(300))
    answers = await asyncio.gather(*(asyncio.to_thread(c.answer) for c in (first, second)))
    if outcome == "completed":
        await running.result()
        assert_outputs(config, [(DATA, qs.config_blob(CFG))])
        assert answers == ["close_notify, FIN"] * 2
    else:
        with pytest.raises(ProtocolError):
            await running.result()
        assert answers == ["reset"] * 2
        assert not config.devices[0].data_path.exists()


# -- refusals ---------------------------------------------------------------------------------


REFUSALS = {
    "plaintext": "not a TLS client hello",
    "foreign CA": "client certificate rejected: unable to get local issuer certificate",
    "no certificate": "the client sent no certificate",
    "expired": "client certificate rejected: certificate has expired",
    "not in authz": "client certificate subject 'O=Example,OU=migration,CN=intruder.example.com'"
    " is not in --tls-authz",
    "revoked (ca-crl.pem)": "client certificate rejected: certificate revoked",
    "distrusts our certificate": "the client does not trust our certificate (unknown CA)",
}


def stray_context(creds: Creds, case: str) -> ssl.SSLContext | None:
    root = creds.root
    if case == "plaintext":
        return None
    if case == "foreign CA":
        return creds.client_context(Authority("Somebody else").client_dir(root / "foreign"))
    if case == "no certificate":
        return creds.client_context()
    if case == "expired":
        past = NOW - datetime.timedelta(days=30), NOW - datetime.timedelta(days=1)
        expired = creds.authority.client_dir(root / "old", not_before=past[0], not_after=past[1])
        return creds.client_context(expired)
    if case == "not in authz":
        intruder = creds.authority.client_dir(root / "intruder", "intruder.example.com")
        return creds.client_context(intruder)
    if case == "distrusts our certificate":
        stranger = Authority("Somebody else")
        context = ssl.create_default_context(cadata=stranger.ca.cert_pem.bytes().decode())
        client = creds.client
        context.load_cert_chain(client / "client-cert.pem", client / "client-key.pem")
        return context
    assert case == "revoked (ca-crl.pem)"
    revoked = creds.authority.client_dir(root / "revoked", "revoked.example.com")
    write_crl(creds.authority, revoked / "client-cert.pem", creds.server / "ca-crl.pem")
    return creds.client_context(revoked)


def write_crl(authority: Authority, revoked_cert: Path, path: Path) -> None:
    """A CRL from ``authority`` revoking ``revoked_cert`` (QEMU's ca-crl.pem)."""
    ca_key = serialization.load_pem_private_key(authority.ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(authority.ca.cert_pem.bytes())
    serial = x509.load_pem_x509_certificate(revoked_cert.read_bytes()).serial_number
    entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW).build()
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(NOW - datetime.timedelta(minutes=1))
        .next_update(NOW + datetime.timedelta(days=1))
        .add_revoked_certificate(entry)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_a_connection_that_fails_tls_is_refused_and_the_migration_goes_on(
    tmp_path: Path, creds: Creds, case: str
) -> None:
    context = stray_context(creds, case)  # (writes ca-crl.pem before the daemon loads it)
    config = tls_settings(tmp_path, creds)
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)
    with structlog.testing.capture_logs() as logs:
        running = await start(config)
        await asyncio.to_thread(stray, running.address, context)
        [error] = await refused(running)
        assert running.session.status.value == "setup"  # still waiting for its channels
        await asyncio.to_thread(send_tls, running.address, creds.client, source)
        result = await running.result()
    assert isinstance(error, HandshakeError) and error.reason is Reason.TLS
    assert REFUSALS[case] in str(error)
    [line] = [e for e in logs if e["event"] == "channel_refused"]
    assert line["reason"] == "tls" and line["log_level"] == "warning"
    assert REFUSALS[case] in line["error"]
    info = query_migrate(running.session.snapshot(time.monotonic()))
    assert info["refused-connections"] == 1
    assert config.devices[0].data_path.read_bytes() == DATA
    assert result.tls_subjects == {0: SUBJECT, 1: SUBJECT}


#: --tls-authz entries that must refuse SUBJECT (O=Example,OU=migration,CN=source.example.com):
#: QEMU's authz-simple compares the whole DN, case and all (g_str_equal).
NEAR_MISSES = {
    "extends it by an RDN": "O=Example,OU=migration",
    "extends a value": "O=Example,OU=migration,CN=source.example",
    "differs in case": "O=example,OU=migration,CN=Source.example.com",
    "differs in the attribute names' case": SUBJECT.lower(),
}


@pytest.mark.parametrize("case", sorted(NEAR_MISSES))
async def test_authz_refuses_a_subject_that_only_nearly_matches(
    tmp_path: Path, creds: Creds, case: str
) -> None:
    """A client subject is in --tls-authz only if one entry is exactly it."""
    allowed = NEAR_MISSES[case]
    config = tls_settings(tmp_path, creds, tls=TlsSettings(creds.server, authz=(allowed,)))
    running = await start(config)
    await asyncio.to_thread(stray, running.address, creds.client_context(creds.client))
    [error] = await refused(running)
    running.session.cancel("the test is over")
    with pytest.raises(Cancelled):
        await running.result()
    assert error.reason is Reason.TLS
    assert f"client certificate subject {SUBJECT!r} is not in --tls-authz" in str(error)
    assert not running.session.core.connections.channels


@pytest.mark.parametrize("where", ["first", "second"])
def test_every_tls_authz_entry_is_honoured(
    tmp_path: Path, creds: Creds, daemons: list[Daemon], where: str
) -> None:
    """Two --tls-authz: a client matching either one is accepted (not only the first's,
    nor only the last's)."""
    entries = [client_subject("other.example.com"), SUBJECT]
    if where == "first":
        entries.reverse()
    authz = [option for entry in entries for option in ("--tls-authz", entry)]
    daemon, data = one_device_daemon(tmp_path, daemons, 2, "--tls-creds", str(creds.server), *authz)
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)
    sent = run(
        ["send", "--connect", daemon.address, "--channels", "2", "--tls-creds", str(creds.client),
         "--device", f"idstr={IDSTR},source={source}", "--chunk-size", "4K"],
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    code, summary, stderr = daemon.finish()
    assert code == 0, stderr
    assert data.read_bytes() == DATA
    assert f"tls: 2 channels; client subject {SUBJECT} (channels 0, 1)" in summary


async def test_the_handshake_timeout_covers_the_tls_handshake(tmp_path: Path, creds: Creds) -> None:
    config = tls_settings(tmp_path, creds, handshake_timeout=0.3)
    running = await start(config)
    silent = raw_connect(running.address)  # connects, says nothing: no TLS hello
    context = creds.client_context(creds.client)
    tls_only = await asyncio.to_thread(BioClient, running.address, context)  # TLS, then nothing
    errors = await refused(running, 2)
    assert [e.reason for e in errors] == [Reason.HANDSHAKE_TIMEOUT] * 2
    await asyncio.to_thread(tls_only.wait_closed)
    silent.close()
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)
    await asyncio.to_thread(send_tls, running.address, creds.client, source)
    await running.result()


async def test_verify_peer_no_accepts_a_client_without_a_certificate_and_warns(
    tmp_path: Path, creds: Creds
) -> None:
    anonymous = creds.root / "anonymous"  # QEMU's client layout without client-cert/key
    anonymous.mkdir()
    (anonymous / "ca-cert.pem").write_bytes((creds.server / "ca-cert.pem").read_bytes())
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)
    with structlog.testing.capture_logs() as logs:
        config = tls_settings(tmp_path, creds, tls=TlsSettings(creds.server, verify_peer=False))
        running = await start(config)
        await asyncio.to_thread(send_tls, running.address, anonymous, source)
        result = await running.result()
    warnings = {e["event"] for e in logs if e["log_level"] == "warning"}
    assert {"tls_verify_peer_off", "tls_no_client_certificate"} <= warnings
    assert result.tls_subjects == {0: None, 1: None}
    assert config.devices[0].data_path.read_bytes() == DATA


# -- the subject string ---------------------------------------------------------------------------


def test_subject_is_compared_as_gnutls_prints_it_in_certificate_order() -> None:
    # openssl req -subj /C=GB/ST=London/L=London/O=Example Org/CN=host: C first, as encoded
    subject = (
        (("countryName", "GB"),),
        (("stateOrProvinceName", "London"),),
        (("localityName", "London"),),
        (("organizationName", "Example Org"),),
        (("commonName", "host.example.com"),),
    )
    assert subject_dn(subject) == "C=GB,ST=London,L=London,O=Example Org,CN=host.example.com"
    # certtool from QEMU's template encodes CN first: QEMU's documented example string
    assert subject_dn(reversed(subject)) == (
        "CN=host.example.com,O=Example Org,L=London,ST=London,C=GB"
    )


def test_subject_names_escapes_and_multivalued_rdns_follow_gnutls() -> None:
    subject = (
        (("domainComponent", "org"),),
        (("userId", "u1"), ("emailAddress", "a@example.org")),  # one RDN, two values
        (("organizationName", 'Example, "Inc" <x>;+\\'),),
        (("organizationalUnitName", "#1 "),),
        (("commonName", " lead"),),
        (("streetAddress", "1 Road"),),
        (("surname", "Doe"),),
        (("1.2.3.4", "unknown"),),
    )
    assert subject_dn(subject) == (
        "DC=org,UID=u1+EMAIL=a@example.org,"
        'O=Example\\, \\"Inc\\" \\<x\\>\\;\\+\\\\,OU=\\#1\\ ,CN=\\ lead,'
        "street=1 Road,surName=Doe,1.2.3.4=unknown"
    )


# -- credential directories -----------------------------------------------------------------------


def break_dir(creds: Creds, case: str) -> tuple[Path, str]:
    """A server directory broken one way, and the file the error must name."""
    server = creds.server
    if case == "missing key":
        (server / "server-key.pem").unlink()
        return server, "server-key.pem"
    if case == "missing CA":
        (server / "ca-cert.pem").unlink()
        return server, "ca-cert.pem"
    if case == "unreadable certificate":
        (server / "server-cert.pem").unlink()
        (server / "server-cert.pem").mkdir()  # unreadable even for root
        return server, "server-cert.pem"
    if case == "key of another certificate":
        other = creds.authority.server_dir(creds.root / "other")
        (server / "server-key.pem").write_bytes((other / "server-key.pem").read_bytes())
        return server, "server-key.pem"
    if case == "garbage CA":
        (server / "ca-cert.pem").write_text("not a certificate\n")
        return server, "ca-cert.pem"
    if case == "garbage CRL":
        (server / "ca-crl.pem").write_text("not a CRL\n")
        return server, "ca-crl.pem"
    if case == "certificate of another CA":
        other = Authority("Other").server_dir(creds.root / "other")
        for name in ("server-cert.pem", "server-key.pem"):
            (server / name).write_bytes((other / name).read_bytes())
        return server, "server-cert.pem"
    if case == "expired certificate":
        cert = creds.authority.ca.issue_cert(
            "127.0.0.1", not_after=NOW - datetime.timedelta(days=1)
        )
        cert.cert_chain_pems[0].write_to_path(str(server / "server-cert.pem"))
        cert.private_key_pem.write_to_path(str(server / "server-key.pem"))
        return server, "server-cert.pem"
    assert case == "encrypted key"
    key = serialization.load_pem_private_key((server / "server-key.pem").read_bytes(), None)
    (server / "server-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return server, "server-key.pem"


BROKEN = [
    "missing key",
    "missing CA",
    "unreadable certificate",
    "key of another certificate",
    "garbage CA",
    "garbage CRL",
    "certificate of another CA",
    "expired certificate",
    "encrypted key",
]


@pytest.mark.parametrize("case", BROKEN)
def test_a_bad_server_directory_is_a_usage_error_naming_the_file(
    tmp_path: Path, creds: Creds, case: str
) -> None:
    directory, name = break_dir(creds, case)
    line = receive_usage_error(tmp_path, "--tls-creds", str(directory))
    assert str(directory / name) in line, line


@pytest.mark.parametrize(
    ("case", "name"),
    [("missing key", "client-key.pem"), ("missing certificate", "client-cert.pem"),
     ("key of another certificate", "client-key.pem"), ("missing CA", "ca-cert.pem")],
)  # fmt: skip
def test_a_bad_client_directory_is_a_usage_error_naming_the_file(
    creds: Creds, case: str, name: str
) -> None:
    client = creds.client
    if case == "missing key":
        (client / "client-key.pem").unlink()
    elif case == "missing certificate":
        (client / "client-cert.pem").unlink()
    elif case == "missing CA":
        (client / "ca-cert.pem").unlink()
    else:
        other = creds.authority.client_dir(creds.root / "other", "other")
        (client / "client-key.pem").write_bytes((other / "client-key.pem").read_bytes())
    result = run(
        ["send", "--connect", "tcp:127.0.0.1:9", "--tls-creds", str(client),
         "--device", "idstr=a,size=1"],
        timeout=20,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert str(client / name) in result.stderr.splitlines()[-1]


def test_tls_option_mistakes_are_usage_errors(tmp_path: Path, creds: Creds) -> None:
    assert "need --tls-creds" in receive_usage_error(tmp_path, "--tls-authz", SUBJECT)
    assert "need --tls-creds" in receive_usage_error(tmp_path, "--tls-verify-peer", "no")
    line = receive_usage_error(
        tmp_path, "--tls-creds", str(creds.server), "--tls-verify-peer", "no",
        "--tls-authz", SUBJECT,
    )  # fmt: skip
    assert "--tls-authz needs --tls-verify-peer yes" in line
    assert "not a directory" in receive_usage_error(tmp_path, "--tls-creds", str(tmp_path / "no"))
    unix = run(
        ["send", "--connect", f"unix:{tmp_path / 's'}", "--tls-creds", str(creds.client),
         "--device", "idstr=a,size=1"],
        timeout=20,
    )  # fmt: skip
    assert unix.returncode == 2 and "needs --tls-hostname" in unix.stderr
    hostname = run(
        ["send", "--connect", "tcp:127.0.0.1:9", "--tls-hostname", "x",
         "--device", "idstr=a,size=1"],
        timeout=20,
    )  # fmt: skip
    assert hostname.returncode == 2 and "--tls-hostname needs --tls-creds" in hostname.stderr


def test_library_checks_match_the_command_line(creds: Creds) -> None:
    server = load_server(TlsSettings(creds.server, authz=(SUBJECT,)))
    assert server.verify_peer and server.authz == {SUBJECT} and not server.crl
    assert server.context.minimum_version is ssl.TLSVersion.TLSv1_2
    client = load_client(creds.client, Address("tcp", "127.0.0.1", 4444))
    assert client.hostname == "127.0.0.1"
    assert load_client(creds.client, Address("tcp", "h", 1), "other").hostname == "other"


# -- the command line, end to end -------------------------------------------------------------------


def test_receive_and_send_with_tls_from_the_command_line(
    tmp_path: Path, creds: Creds, daemons: list[Daemon]
) -> None:
    out = tmp_path / "nic0.bin"
    daemon = Daemon(
        tmp_path, "--channels", "2", "--tls-creds", str(creds.server), "--tls-authz", SUBJECT,
        "--device", f"idstr={IDSTR},data={out}",
    )  # fmt: skip
    daemons.append(daemon)
    stray(daemon.address, None)  # a plaintext client first: refused, the daemon goes on
    source = tmp_path / "source.bin"
    source.write_bytes(random_bytes(3 << 20, 4))
    sent = run(
        ["send", "--connect", daemon.address, "--channels", "2", "--tls-creds",
         str(creds.client), "--device", f"idstr={IDSTR},source={source}", "--log-format", "json"],
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    code, summary, stderr = daemon.finish()
    assert code == 0, stderr
    assert out.read_bytes() == source.read_bytes()
    assert digests(summary) == digests(sent.stdout) and len(digests(summary)) == 1
    assert f"tls: 2 channels; client subject {SUBJECT} (channels 0, 1)" in summary
    events = daemon.events()
    [refusal] = [e for e in events if e["event"] == "channel_refused"]
    assert refusal["reason"] == "tls" and "not a TLS client hello" in str(refusal["error"])
    assert sum(e["event"] == "tls_established" for e in events) == 2
    [completed] = [e for e in events if e["event"] == "migration_completed"]
    assert completed["tls"] is True


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the example makes its certificates with openssl"
)
def test_the_tls_loopback_example_runs() -> None:
    """examples/tls-loopback.sh: credentials from openssl (another generator than trustme),
    a plaintext sender refused, a TLS migration whose digests match."""
    script = Path(__file__).parent.parent / "examples" / "tls-loopback.sh"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "TMPDIR": "/tmp"}
    done = subprocess.run(
        ["bash", str(script), "4M"], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "a plaintext sender was refused" in done.stdout and '"reason": "tls"' in done.stdout
    assert "tls: 4 channels; client subject O=Example,CN=source.example.com" in done.stdout
    assert done.stdout.rstrip().endswith("digests match")
