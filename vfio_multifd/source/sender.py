"""The multi-channel source: a stand-in for QEMU's sending side.

Used by tests, ``make demo`` and the benchmarks. What is sent, on which
channel, is ``plan.py``'s; the faults ``--inject`` puts in are
``faults.py``'s; connecting and the daemon's verdict are ``channels.py``'s.
Each channel is a thread with a blocking socket that sends a packet's header
and data with one ``sendmsg`` (no copy of the data).
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import Address, Digest, check_channels
from ..core.wire import ChannelHandshake, DeviceKey, encode_packet_prefix
from ..errors import Cancelled, UsageError
from .channels import ChannelStream, run_channels, send_all
from .faults import FAULTS, corrupt, handshake_bytes, packet_of, plan_fault
from .plan import DEFAULT_CHUNK_SIZE, DeviceState, Packet, SourceDevice, plan

if TYPE_CHECKING:
    from ..tls import TlsClient


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


class Stopped(KeyboardInterrupt):
    """A signal that stops the sender (SIGTERM; SIGINT is a plain KeyboardInterrupt)."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


@dataclass(slots=True)
class _Source:
    """One ``send``: its devices, the plan, and what each channel sent so far (each
    counter written by its own channel's thread only)."""

    states: list[DeviceState]
    per_channel: list[list[Packet]]
    uuid: bytes
    inject: str | None
    progress: Callable[[int, int], None] | None
    tally: SendTally
    stop: threading.Event = field(default_factory=threading.Event)
    data_sent: list[int] = field(default_factory=list)
    packets_sent: list[int] = field(default_factory=list)

    def stream(self, channel_id: int) -> ChannelStream:
        """What channel ``channel_id`` sends: its handshake, then its packets."""

        def run(sock: socket.socket) -> int:
            channels = len(self.per_channel)
            fault = self.inject if channel_id == 0 else None
            handshake = ChannelHandshake(channel_id, self.uuid)
            total = send_all(sock, [handshake_bytes(handshake, fault, channels)])
            self.tally.channel_bytes[channel_id] = total
            for n, (d, idx) in enumerate(self.per_channel[channel_id]):
                if self.stop.is_set():  # another channel failed
                    break
                key, data, config = packet_of(self.states, d, idx, self.inject)
                prefix = encode_packet_prefix(key, idx, len(data), config)
                if n == 0 and fault is not None:
                    if fault == "truncate":
                        total += send_all(sock, [prefix[: len(prefix) // 2]])
                        self.tally.channel_bytes[channel_id] = total
                        return total
                    prefix, data = corrupt(fault, prefix, data)
                total += send_all(sock, [prefix, data])
                self.tally.channel_bytes[channel_id] = total
                self._sent(channel_id, d, idx, len(data))
            return total

        return run

    def _sent(self, channel_id: int, d: int, idx: int, size: int) -> None:
        self.packets_sent[channel_id] += 1
        if d >= 0 and idx < self.states[d].chunks:
            self.data_sent[channel_id] += size
            if self.progress is not None:
                self.progress(d, size)

    def stopped(self, address: Address, interrupt: KeyboardInterrupt) -> Cancelled:
        what = _what_was_sent(
            address,
            data=(sum(self.data_sent), sum(state.device.size for state in self.states)),
            packets=(sum(self.packets_sent), sum(len(p) for p in self.per_channel)),
        )
        return stopped_by(interrupt, what)


def stopped_by(interrupt: KeyboardInterrupt, what: str) -> Cancelled:
    """A send (or replay) stopped by a signal (SIGINT unless the handler said which):
    "stopped by SIGNAME <what>"."""
    signum = getattr(interrupt, "signal_number", signal.SIGINT)
    return Cancelled(f"stopped by {signal.Signals(signum).name} {what}", signal_number=signum)


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
    daemon's verdict (see :func:`~.channels.run_channels`).

    ``progress(device_index, nbytes)`` is called after each data chunk is sent,
    from the channel's own thread (so it must be thread-safe). ``tally``, if given,
    is kept up to date as the send goes. Raises
    :class:`SendError` when a channel fails, and :class:`Cancelled` saying what
    was sent when stopped by SIGINT (or a :class:`Stopped` signal).
    """
    tally, states = device_states(devices, channels=channels, chunk_size=chunk_size, tally=tally)
    source = _Source(states, [], uuid, inject, progress, tally, data_sent=[0] * channels,
                     packets_sent=[0] * channels)  # fmt: skip
    try:
        digests = tally.digests = [state.digest(digest) for state in states]
        source.per_channel = plan(states, channels, order, seed)
        if inject is not None and inject not in FAULTS:
            raise UsageError(f"unknown --inject {inject!r} (one of {', '.join(FAULTS)})")
        if inject is not None:
            source.per_channel = plan_fault(inject, states, source.per_channel)
        sent, seconds = _send_streams(source, address, channels, connect_timeout, tls, tally)
    except KeyboardInterrupt as interrupt:
        raise source.stopped(address, interrupt) from None
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


def _send_streams(
    source: _Source,
    address: Address,
    channels: int,
    connect_timeout: float,
    tls: TlsClient | None,
    tally: SendTally,
) -> tuple[list[int], float]:
    """Every channel's stream, sent: the bytes each channel sent, and the seconds it took."""
    started = tally.started = time.monotonic()
    streams = [source.stream(n) for n in range(channels)]
    try:
        sent = run_channels(
            address,
            streams,
            connect_timeout,
            stop=source.stop,
            tls=tls,
            # A daemon expecting more channels fails once these ended; one expecting
            # fewer refuses the ids it does not know.
            reset_hint=f"; a daemon whose --channels is not {channels}, as here, does either",
        )
    finally:
        tally.ended = time.monotonic()
    return sent, tally.ended - started


def device_states(
    devices: Sequence[SourceDevice], *, channels: int, chunk_size: int, tally: SendTally | None
) -> tuple[SendTally, list[DeviceState]]:
    """A send's options checked, each device's state, and the tally set up for them."""
    check_channels(channels)
    if chunk_size <= 0:
        raise UsageError("--chunk-size must be positive")
    tally = SendTally() if tally is None else tally
    tally.channel_bytes = [0] * channels
    states = [DeviceState(device, chunk_size) for device in devices]
    tally.chunks = [state.chunks for state in states]
    return tally, states


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
