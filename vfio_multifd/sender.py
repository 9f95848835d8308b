"""The multi-channel source: a stand-in for QEMU's sending side.

Used by tests, ``make demo`` and the benchmarks. Each device's state is cut
into chunks of at most ``chunk_size`` bytes, numbered from 0, followed by the
config-state packet (``idx`` = number of chunks). The packets are put in the
chosen order and dealt to the channels round-robin, as QEMU's source picks
channels; each channel is a thread with a blocking socket that sends a
packet's header and data with one ``sendmsg`` (no copy of the data).

Generated data (``size=``) is a random block of ``chunk_size`` bytes per
device, and chunk ``idx`` is a rotation of it by an offset drawn from
``idx``: every chunk differs and misplacing one changes the digest, yet
producing it costs no CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import errno
import fcntl
import os
import random
import signal
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from .config import (
    Address,
    Digest,
    check_channels,
    parse_device_key,
    parse_fields,
    parse_size,
)
from .digest import format_digest, new_hasher
from .errors import Cancelled, Reason, SendError, UsageError, os_error_text
from .wire import ChannelHandshake, DeviceKey, encode_config_blob, encode_packet_prefix

if TYPE_CHECKING:
    from .tls import TlsClient

ORDERS = ("round-robin", "reverse", "random")

#: Faults ``--inject`` can put into channel 0's stream, to show each error.
FAULTS = {
    "handshake-magic": "channel 0's handshake has a wrong magic (refused)",
    "handshake-version": "channel 0's handshake has version 2 (refused)",
    "handshake-uuid": "channel 0's handshake carries another VM's uuid (refused)",
    "handshake-id": "channel 0 claims id = --channels (refused)",
    "main-channel": "channel 0 starts like QEMU's main channel, QEVM (refused)",
    "bad-magic": "the first packet has a wrong magic",
    "bad-version": "the first packet has version 2",
    "ram": "a RAM packet (flags 0) instead of the first packet",
    "sync": "the first packet has the SYNC bit set",
    "idstr-unterminated": "the first packet's idstr fills all 256 bytes",
    "zero-size": "the first packet says next_packet_size 0",
    "oversize": "the first packet says next_packet_size 2 GiB",
    "short-vfio": "the first packet's payload is shorter than the VFIO header",
    "vfio-version": "the first packet has VFIO version 1",
    "invalid-idx": "the first packet has idx 0xffffffff",
    "duplicate": "the first packet is sent twice",
    "unknown-device": "an extra packet for a device the destination does not know",
    "after-config": "channel 0 first sends a chunk of the first device with an idx beyond "
    "its config packet's",
    "second-config": "channel 0 first sends a second config packet (another idx) of the "
    "first device",
    "bad-config": "the first device's config blob lacks its tags",
    "missing": "the first device's chunk 0 is never sent",
    "truncate": "channel 0 closes in the middle of its first packet",
}
DEFAULT_CHUNK_SIZE = 1 << 20
CONFIG_SIZE = 256


@dataclass(frozen=True, slots=True)
class SourceDevice:
    """``idstr=ID,instance=I,(source=FILE | size=BYTES[,seed=S])``."""

    key: DeviceKey
    source: Path | None = None
    size: int = 0
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> SourceDevice:
        fields = parse_fields(
            text, what="device", allowed={"idstr", "instance", "source", "size", "seed"}
        )
        key = parse_device_key(fields, text)
        if ("source" in fields) == ("size" in fields):
            raise UsageError(f"device {text!r}: give exactly one of source=FILE or size=BYTES")
        seed = fields.get("seed", "0")
        if not seed.isdigit():
            raise UsageError(f"device {text!r}: seed must be a number, not {seed!r}")
        if "source" in fields:
            path = Path(fields["source"])
            try:
                size = path.stat().st_size
            except OSError as error:
                raise UsageError(f"device {text!r}: cannot read {path}: {error.strerror}") from None
            return cls(key, path, size, int(seed))
        return cls(key, None, parse_size(fields["size"]), int(seed))


class DeviceState:
    """One device's chunks and config blob, produced on demand."""

    def __init__(self, device: SourceDevice, chunk_size: int) -> None:
        self.device = device
        self.key = device.key
        self.chunk_size = chunk_size
        self.chunks = -(-device.size // chunk_size)  # the config packet's idx
        rng = random.Random(f"{device.seed}:{device.key.idstr}:{device.key.instance_id}")
        self.config_blob = encode_config_blob(rng.randbytes(CONFIG_SIZE))
        self._fd: int | None = None
        self._block: memoryview | None = None
        if device.source is not None:
            self._fd = os.open(device.source, os.O_RDONLY | os.O_CLOEXEC)
        else:
            block = rng.randbytes(min(chunk_size, max(device.size, 1)))
            self._block = memoryview(block + block)
        self._rotation = rng.getrandbits(64)

    def chunk(self, idx: int) -> bytes | memoryview:
        """The data of chunk ``idx`` (the config blob for the last idx)."""
        if idx == self.chunks:
            return self.config_blob
        offset = idx * self.chunk_size
        size = min(self.chunk_size, self.device.size - offset)
        if self._fd is not None:
            return os.pread(self._fd, size, offset)
        block = self._block
        assert block is not None
        period = len(block) // 2
        start = ((idx + 1) * self._rotation >> 7) % period
        return block[start : start + size]

    def digest(self, digest: Digest) -> str:
        hasher = new_hasher(digest)
        for idx in range(self.chunks):
            hasher.update(self.chunk(idx))
        return format_digest(digest, hasher)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


Packet = tuple[int, int]  # (device index, idx)


def plan(
    devices: Sequence[DeviceState], channels: int, order: str, seed: int
) -> list[list[Packet]]:
    """Which packets each channel sends, in the order it sends them."""
    sequences = [[(d, idx) for idx in range(state.chunks + 1)] for d, state in enumerate(devices)]
    if order == "reverse":
        sequences = [list(reversed(seq)) for seq in sequences]
    packets = list(_interleave(sequences))
    if order == "random":
        random.Random(seed).shuffle(packets)
    elif order not in ORDERS:
        raise UsageError(f"unknown --order {order!r} (one of {', '.join(ORDERS)})")
    per_channel: list[list[Packet]] = [[] for _ in range(channels)]
    for n, packet in enumerate(packets):
        per_channel[n % channels].append(packet)
    return per_channel


def _interleave(sequences: list[list[Packet]]) -> Iterator[Packet]:
    """One packet of each device in turn, as concurrent per-device send threads would."""
    longest = max((len(seq) for seq in sequences), default=0)
    for n in range(longest):
        for seq in sequences:
            if n < len(seq):
                yield seq[n]


def _handshake_bytes(handshake: ChannelHandshake, fault: str | None, channels: int) -> bytes:
    raw = bytearray(handshake.encode())
    if fault == "handshake-magic":
        raw[0:4] = b"\xde\xad\xbe\xef"
    elif fault == "handshake-version":
        raw[4:8] = (2).to_bytes(4, "big")
    elif fault == "handshake-uuid":
        raw[8:24] = bytes(range(1, 17)) if raw[8:24] != bytes(range(1, 17)) else bytes(16)
    elif fault == "handshake-id":
        raw[24] = channels
    elif fault == "main-channel":
        raw[0:8] = b"QEVM\x00\x00\x00\x03"
    return bytes(raw)


def _corrupt(
    fault: str, prefix: bytes, data: bytes | memoryview
) -> tuple[bytes, bytes | memoryview]:
    """Damage the first packet of channel 0 (the header fields at PROTOCOL.md 2.3/2.4 offsets)."""
    raw = bytearray(prefix)
    if fault == "bad-magic":
        raw[0:4] = b"\x12\x34\x56\x78"
    elif fault == "bad-version":
        raw[4:8] = (2).to_bytes(4, "big")
    elif fault == "ram":
        raw[8:12] = bytes(4)
    elif fault == "sync":
        raw[11] |= 0x01
    elif fault == "idstr-unterminated":
        raw[12:268] = b"x" * 256
    elif fault == "zero-size":
        raw[272:276] = bytes(4)
    elif fault == "oversize":
        raw[272:276] = (0x80000000).to_bytes(4, "big")
    elif fault == "short-vfio":
        raw[272:276] = (8).to_bytes(4, "big")
        return bytes(raw[:284]), b""
    elif fault == "vfio-version":
        raw[276:280] = (1).to_bytes(4, "big")
    elif fault == "invalid-idx":
        raw[280:284] = (0xFFFFFFFF).to_bytes(4, "big")
    return bytes(raw), data


log = structlog.get_logger("vfio_multifd.sender")

UNKNOWN_DEVICE = DeviceKey("0000:99:00.0/unknown", 0)


def _packet(
    states: Sequence[DeviceState], d: int, idx: int, fault: str | None
) -> tuple[DeviceKey, bytes | memoryview, bool]:
    """Device, data and CONFIG_STATE flag of planned packet (d, idx)."""
    if d < 0:
        return UNKNOWN_DEVICE, b"who am I", False
    state = states[d]
    if idx > state.chunks:  # an injected packet after the config packet
        second = fault == "second-config"
        return state.key, state.config_blob if second else b"late chunk", second
    if fault == "bad-config" and d == 0 and idx == state.chunks:
        return state.key, bytes(24), True
    return state.key, state.chunk(idx), idx == state.chunks


def _plan_fault(
    fault: str, states: Sequence[DeviceState], per_channel: list[list[Packet]]
) -> list[list[Packet]]:
    """Faults that add or remove whole packets change the plan of channel 0."""
    first = [list(packets) for packets in per_channel]
    channel0 = first[0]
    last = states[0].chunks
    if fault == "duplicate" and channel0:
        channel0.insert(1, channel0[0])
    elif fault in ("after-config", "second-config"):
        # An idx beyond the config packet's, first on channel 0: ahead of packets
        # the device needs, so the destination sees it before the device can
        # complete (sent last, it could complete first and the fault show nothing).
        channel0.insert(0, (0, last + 1))
    elif fault == "missing":
        first = [[p for p in packets if p != (0, 0)] for packets in first]
    elif fault == "unknown-device":
        channel0.insert(0, (-1, 0))
    return first


@dataclass(slots=True)
class SendResult:
    devices: list[tuple[DeviceKey, int, int, str]]  # key, bytes, chunks, digest
    seconds: float
    bytes_sent: int
    channel_bytes: list[int] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return sum(d[1] for d in self.devices) / 1e6 / self.seconds if self.seconds else 0.0


@dataclass(slots=True)
class SendTally:
    """What :func:`send` has done so far, kept up to date as it goes, so that what a
    failed or stopped send did can be told too (``send --result``)."""

    chunks: list[int] = field(default_factory=list)  # each device's data chunks
    digests: list[str] = field(default_factory=list)  # each device's, once computed
    channel_bytes: list[int] = field(default_factory=list)  # sent on each channel so far
    started: float | None = None  # monotonic: the first connection was attempted
    ended: float | None = None  # monotonic: every channel ended (or failed)


def connect(address: Address, timeout: float, *, channel: int | None = None) -> socket.socket:
    """Connect, retrying while nothing listens at ``address`` yet (for ``timeout`` seconds;
    a log line says so, and until when). Raises :class:`SendError` naming the address."""
    deadline = time.monotonic() + timeout
    retrying = False
    while True:
        try:
            return _connect_once(address, timeout)
        except (ConnectionRefusedError, FileNotFoundError) as error:
            left = deadline - time.monotonic()
            if left < 0:
                raise SendError(
                    Reason.CONNECT_FAILED,
                    f"cannot connect to {address} within {timeout:g} s (--connect-timeout): "
                    f"{_why(error)}",
                    channel=channel,
                ) from None
            if not retrying:
                retrying = True
                until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=left)
                log.warning(
                    "connect_retrying",
                    channel=channel,
                    address=str(address),
                    error=_why(error),
                    until=until.strftime("%Y-%m-%dT%H:%M:%SZ"),  # as the log's timestamps
                    connect_timeout=timeout,
                )
            time.sleep(0.05)
        except OSError as error:
            raise SendError(
                Reason.CONNECT_FAILED,
                f"cannot connect to {address}: {_why(error)}",
                channel=channel,
            ) from None


def _connect_once(address: Address, timeout: float) -> socket.socket:
    if address.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address.path)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((address.host, address.port), timeout=timeout)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _why(error: OSError) -> str:
    if isinstance(error, socket.gaierror):  # a host name that does not resolve
        return str(error.strerror)
    if isinstance(error, TimeoutError) and not error.errno:
        return "timed out"
    return os_error_text(error)


def send_all(sock: socket.socket, buffers: list[bytes | memoryview]) -> int:
    """``sendmsg`` until every byte of ``buffers`` is out (over TLS, which has no
    ``sendmsg``: each buffer in turn, cut into records by OpenSSL)."""
    total = sum(len(b) for b in buffers)
    if isinstance(sock, ssl.SSLSocket):
        for buffer in buffers:
            sock.sendall(buffer)
        return total
    sent = sock.sendmsg(buffers)
    if sent < total:  # rare on a blocking socket: finish the rest plainly
        rest = b"".join(bytes(b) for b in buffers)[sent:]
        sock.sendall(rest)
    return total


ChannelStream = Callable[[socket.socket], int]


class StreamEnd(enum.Enum):
    """What a channel does once its stream is sent (``run_channels``' ``ends``)."""

    CLOSE = "close"  # end the stream (a FIN; over TLS close_notify first), await the verdict
    KEEP_OPEN = "keep-open"  # await the verdict without ending the stream
    RESET = "reset"  # reset the connection, as a source that broke off: no verdict to await


def run_channels(
    address: Address,
    streams: Sequence[ChannelStream],
    timeout: float,
    *,
    stop: threading.Event | None = None,
    tls: TlsClient | None = None,
    channel_ids: Sequence[int] | None = None,
    ends: Sequence[StreamEnd] | None = None,
    reset_hint: str = "",
) -> list[int]:
    """Connect every channel, run each stream on its own thread, then wait for the
    daemon's verdict; returns the bytes each channel sent.

    The daemon answers nothing on a channel: it closes every channel cleanly once
    the migration completed (its outputs in place) and resets them when it failed
    or refused one. A reset, or any other error, raises :class:`SendError` naming
    the channel and the address, and resets every other channel at once (so that
    the daemon fails too, rather than wait for them). ``stop`` is set then: a
    stream that checks it between packets stops early. With ``tls`` each channel
    does its TLS handshake first, and ends with ``close_notify``; a clean close
    is then the daemon's ``close_notify`` and a FIN, and an end without its
    ``close_notify`` is a failure too (over a unix socket, where a reset cannot
    be sent, that is how the daemon says the migration failed).

    Streams connect in the order given; ``channel_ids`` names them in errors and
    logs (default 0, 1...: their place). ``ends`` says how each ends once sent
    (default: all :attr:`StreamEnd.CLOSE`); a replay ends each as it was recorded.
    ``reset_hint`` is added to the message of a reset: what else could explain it.
    """
    stop = stop or threading.Event()
    ids = list(range(len(streams))) if channel_ids is None else list(channel_ids)
    endings = [StreamEnd.CLOSE] * len(streams) if ends is None else list(ends)
    socks: list[socket.socket] = []
    try:
        for n in range(len(streams)):
            sock = connect(address, timeout, channel=ids[n])
            socks.append(sock if tls is None else tls.wrap(sock))
    except BaseException:
        for sock in socks:
            _reset(sock)
            sock.close()
        raise
    sent = [0] * len(streams)
    errors: list[BaseException] = []
    finished: list[int] = []  # channels that sent their whole stream
    lock = threading.Lock()

    def abort() -> None:
        stop.set()
        for sock in socks:
            _reset(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)  # wakes a thread waiting for the verdict

    def worker(n: int) -> None:
        sock = socks[n]
        try:
            try:
                sent[n] = streams[n](sock)
            except OSError as error:
                if not stop.is_set():
                    raise _channel_error(
                        ids[n], address, error, sent=None, sock=sock, hint=reset_hint
                    ) from None
                return
            if stop.is_set():
                return
            with lock:
                finished.append(n)
                if len(finished) == len(streams):
                    log.info(
                        "waiting_for_daemon",
                        address=str(address),
                        bytes=sum(sent),
                        why="everything is sent; the daemon closes every channel once its "
                        "outputs are in place, or resets them if the migration failed",
                    )
            if endings[n] is StreamEnd.RESET:
                _reset_once_delivered(sock)  # the close below is the reset
                return
            try:
                if endings[n] is StreamEnd.CLOSE:
                    _end_stream(sock)
                # Kept open over TLS, the stream is still TLS: no close_notify was sent.
                _await_verdict(sock, tls=tls is not None and endings[n] is StreamEnd.KEEP_OPEN)
            except OSError as error:
                if not stop.is_set():
                    raise _channel_error(
                        ids[n], address, error, sent=sent[n], sock=sock, hint=reset_hint
                    ) from None
        except BaseException as error:  # reported by the caller
            with lock:
                errors.append(error)
            abort()
        finally:
            sock.close()

    threads = [
        threading.Thread(target=worker, args=(n,), name=f"send-channel-{ids[n]}", daemon=True)
        for n in range(len(streams))
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:  # SIGINT, SIGTERM: the daemon sees the channels reset
        abort()
        deadline = time.monotonic() + 1.0  # a thread stuck in sendmsg is left to exit
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        raise
    if errors:
        raise errors[0]
    return sent


def _end_stream(sock: socket.socket) -> None:
    """The clean end of a channel: a FIN, or over TLS a ``close_notify``.

    Over TLS this waits for the daemon's ``close_notify``, which it sends only with
    its outputs in place (then a FIN, see :func:`_await_verdict`); a reset, or an end
    without it, raises :class:`OSError`, whatever the daemon did before."""
    if isinstance(sock, ssl.SSLSocket):
        sock.unwrap()  # the SSLSocket reads and writes plainly from now on
    else:
        sock.shutdown(socket.SHUT_WR)


def _await_verdict(sock: socket.socket, *, tls: bool) -> None:
    """Return once the daemon closed the channel cleanly: a FIN, after its ``close_notify``
    (ours in return) if the stream is still ``tls``. A reset raises :class:`OSError`,
    and so does, over TLS, an end without ``close_notify`` (:class:`ssl.SSLEOFError`:
    ragged ends are not suppressed, see ``tls.py``). The destination answers nothing
    else: a byte it sends is ignored."""
    if tls and isinstance(sock, ssl.SSLSocket):
        while sock.recv(4096):
            pass
        sock.unwrap()
    while sock.recv(4096):
        pass


def _reset(sock: socket.socket) -> None:
    """Make the socket's close a reset (TCP RST), not a clean end of stream."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


#: ``tcpi_state`` of a TCP connection that is gone (linux/tcp_states.h).
_TCP_CLOSE = 7


def _was_reset(sock: socket.socket) -> bool:
    """The daemon reset this TCP connection (we never end one with a FIN before the
    verdict, so a closed state means a reset)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE
    except OSError:  # a unix socket: no TCP state, and no reset either
        return False


#: How long a stream that ends in a reset waits for the daemon to have its bytes.
RESET_DELIVERY_TIMEOUT = 5.0


def _reset_once_delivered(sock: socket.socket) -> None:
    """Make the close a reset, once the daemon's kernel has acknowledged every byte
    sent (for at most :data:`RESET_DELIVERY_TIMEOUT`): a reset discards what the
    socket still holds, and the daemon must read all a replayed stream had."""
    outq = getattr(termios, "TIOCOUTQ", None)  # SIOCOUTQ: bytes not yet acknowledged
    if outq is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        deadline = time.monotonic() + RESET_DELIVERY_TIMEOUT
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                (unacknowledged,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), outq, bytes(4)))
                if not unacknowledged:
                    break
                time.sleep(0.005)
    _reset(sock)


def _channel_error(
    channel: int,
    address: Address,
    error: OSError,
    *,
    sent: int | None,
    sock: socket.socket | None = None,
    hint: str = "",
) -> SendError:
    """Why channel ``channel`` ended: ``sent`` is its byte count if it had sent everything."""
    when = (
        "while this channel was sending"
        if sent is None
        else f"after this channel sent all its {sent} bytes"
    )
    verdict = (
        f"it refused this channel or the migration failed (the daemon's error says which{hint})"
    )
    # Over TLS a reset is mostly reported as an end without close_notify: TCP says which.
    if isinstance(error, ssl.SSLEOFError) and (sock is None or not _was_reset(sock)):
        return SendError(
            Reason.CHANNEL_RESET,
            f"{address}: the daemon ended the connection without TLS close_notify {when}: "
            f"{verdict}",
            channel=channel,
        )
    # ENOTCONN: the reset came before our shutdown(SHUT_WR), and Linux then reports
    # the connection gone rather than the reset that ended it.
    if (
        isinstance(error, ConnectionResetError | BrokenPipeError | ssl.SSLEOFError)
        or error.errno == errno.ENOTCONN
    ):
        return SendError(
            Reason.CHANNEL_RESET,
            f"{address}: the daemon reset the connection {when}: {verdict}",
            channel=channel,
        )
    return SendError(
        Reason.SEND_FAILED, f"{address}: {_why(error)} {when}", channel=channel
    )


class Stopped(KeyboardInterrupt):
    """A signal that stops the sender (SIGTERM; SIGINT is a plain KeyboardInterrupt)."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


def send(
    address: Address,
    devices: Sequence[SourceDevice],
    *,
    channels: int = 2,
    uuid: bytes = bytes(16),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    order: str = "round-robin",
    seed: int = 0,
    digest: Digest = Digest.XXH3_128,
    connect_timeout: float = 30.0,
    inject: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    tls: TlsClient | None = None,
    tally: SendTally | None = None,
) -> SendResult:
    """Send ``devices`` over ``channels`` connections to ``address``, and wait for the
    daemon's verdict (see :func:`run_channels`).

    ``progress(device_index, nbytes)`` is called after each data chunk is sent,
    from the channel's own thread (so it must be thread-safe). ``tally``, if given,
    is kept up to date as the send goes. Raises
    :class:`SendError` when a channel fails, and :class:`Cancelled` saying what
    was sent when stopped by SIGINT (or a :class:`Stopped` signal).
    """
    check_channels(channels)
    if chunk_size <= 0:
        raise UsageError("--chunk-size must be positive")
    tally = SendTally() if tally is None else tally
    tally.channel_bytes = [0] * channels
    states = [DeviceState(device, chunk_size) for device in devices]
    tally.chunks = [state.chunks for state in states]
    # What each channel sent so far, each written by its own channel's thread only.
    data_sent = [0] * channels
    packets_sent = [0] * channels
    per_channel: list[list[Packet]] = []
    stop = threading.Event()
    try:
        digests = tally.digests = [state.digest(digest) for state in states]
        per_channel = plan(states, channels, order, seed)
        if inject is not None and inject not in FAULTS:
            raise UsageError(f"unknown --inject {inject!r} (one of {', '.join(FAULTS)})")
        if inject is not None:
            per_channel = _plan_fault(inject, states, per_channel)

        def stream(channel_id: int) -> ChannelStream:
            def run(sock: socket.socket) -> int:
                fault = inject if channel_id == 0 else None
                handshake = ChannelHandshake(channel_id, uuid)
                total = send_all(sock, [_handshake_bytes(handshake, fault, channels)])
                tally.channel_bytes[channel_id] = total
                for n, (d, idx) in enumerate(per_channel[channel_id]):
                    if stop.is_set():  # another channel failed
                        break
                    key, data, config = _packet(states, d, idx, inject)
                    prefix = encode_packet_prefix(key, idx, len(data), config)
                    if n == 0 and fault is not None:
                        if fault == "truncate":
                            total += send_all(sock, [prefix[: len(prefix) // 2]])
                            tally.channel_bytes[channel_id] = total
                            return total
                        prefix, data = _corrupt(fault, prefix, data)
                    total += send_all(sock, [prefix, data])
                    tally.channel_bytes[channel_id] = total
                    packets_sent[channel_id] += 1
                    if d >= 0 and idx < states[d].chunks:
                        data_sent[channel_id] += len(data)
                        if progress is not None:
                            progress(d, len(data))
                return total

            return run

        started = tally.started = time.monotonic()
        try:
            sent = run_channels(
                address,
                [stream(n) for n in range(channels)],
                connect_timeout,
                stop=stop,
                tls=tls,
                # A daemon expecting more channels fails once these ended; one expecting
                # fewer refuses the ids it does not know.
                reset_hint=f"; a daemon whose --channels is not {channels}, as here, does either",
            )
        finally:
            tally.ended = time.monotonic()
        seconds = tally.ended - started
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signal_number", signal.SIGINT)
        what = _what_was_sent(
            address,
            data=(sum(data_sent), sum(state.device.size for state in states)),
            packets=(sum(packets_sent), sum(len(packets) for packets in per_channel)),
        )
        raise Cancelled(
            f"stopped by {signal.Signals(signum).name} {what}", signal_number=signum
        ) from None
    finally:
        for state in states:
            state.close()
    return SendResult(
        devices=[
            (state.key, state.device.size, state.chunks, digests[n])
            for n, state in enumerate(states)
        ],
        seconds=seconds,
        bytes_sent=sum(sent),
        channel_bytes=sent,
    )


def _what_was_sent(address: Address, *, data: tuple[int, int], packets: tuple[int, int]) -> str:
    """For the message of a sender stopped by a signal: ``(done, total)`` data bytes, packets."""
    if packets[1] == 0 or packets[0] == 0:
        return f"before any packet was sent to {address}"
    so_far = (
        f"{data[0]} of {data[1]} data bytes ({packets[0]} of {packets[1]} packets) to {address}"
    )
    if packets[0] < packets[1]:
        return f"after sending {so_far}: the migration is incomplete (its channels are reset)"
    return (
        f"after sending all {so_far}, before the daemon closed the channels: it had not "
        "completed the migration yet"
    )
