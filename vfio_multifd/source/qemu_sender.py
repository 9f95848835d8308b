"""``send --ram SIZE``: the source acting like QEMU 10, main channel included.

The migration is encoded whole by ``qemu_like.py`` (pure) and held in memory:
the main channel (configuration, the ``ram`` section with its block list and
``MULTIFD_FLUSH`` sync points, each device's sections, ``QEMU_VM_EOF`` and the
VM description) and, on the multifd channels, RAM and SYNC packets with the
devices' stop-copy chunks among the last round's pages. The guest's RAM is
``qemu_like.guest_ram``: deterministic from ``--seed``, several rounds, as a
running guest's. Each connection is then one stream, as ``sender.py`` sends
device state alone; the daemon's verdict is awaited the same way.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Address, Digest
from ..errors import UsageError
from .channels import ChannelStream, run_channels, send_all
from .plan import DeviceState, SourceDevice
from .qemu_like import GUEST_RAM_BLOCK, QemuLikeStreams, VfioDevice, guest_ram, qemu10_migration
from .sender import SendResult, SendTally, device_states, stopped_by

if TYPE_CHECKING:
    from ..tls import TlsClient

#: Rounds of the guest's RAM: all of it, one round of dirty pages, the stop-copy round.
RAM_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class RamSent:
    """What ``send --ram`` sent beside the devices, for its summary."""

    block: str
    size: int
    rounds: int
    normal_pages: int
    zero_pages: int
    sync_points: int
    main_bytes: int


def send_like_qemu(
    address: Address,
    devices: Sequence[SourceDevice],
    *,
    ram_size: int,
    channels: int = 2,
    uuid: bytes = bytes(16),
    chunk_size: int,
    seed: int = 0,
    digest: Digest = Digest.XXH3_128,
    connect_timeout: float = 30.0,
    tls: TlsClient | None = None,
    tally: SendTally | None = None,
) -> tuple[SendResult, RamSent]:
    """Send ``devices`` and ``ram_size`` bytes of guest RAM as QEMU 10 does (main channel
    first, then ``channels`` multifd channels), and wait for the daemon's verdict.
    Raises as :func:`~.sender.send` does."""
    tally, states = device_states(devices, channels=channels, chunk_size=chunk_size, tally=tally)
    streams = _encode(states, ram_size, seed, channels, uuid, digest, tally)
    started = tally.started = time.monotonic()
    try:
        try:
            sent = run_channels(
                address,
                [_stream(streams.main, None, tally)]
                + [_stream(data, n, tally) for n, data in enumerate(streams.channels)],
                connect_timeout,
                tls=tls,
                channel_ids=[None, *range(channels)],
                reset_hint=f"; a daemon without --main-stream and --ram, or whose --channels "
                f"is not {channels}, as here, does either",
            )
        finally:
            tally.ended = time.monotonic()
    except KeyboardInterrupt as interrupt:
        raise stopped_by(
            interrupt,
            f"before the daemon closed the channels to {address}: the migration is "
            "incomplete (its channels are reset)",
        ) from None
    result = SendResult(
        devices=[
            (state.key, state.device.size, state.chunks, tally.digests[n])
            for n, state in enumerate(states)
        ],
        seconds=tally.ended - started,
        bytes_sent=sum(sent),
        channel_bytes=sent[1:],
    )
    return result, _ram_sent(streams, ram_size)


def _encode(
    states: Sequence[DeviceState],
    ram_size: int,
    seed: int,
    channels: int,
    uuid: bytes,
    digest: Digest,
    tally: SendTally,
) -> QemuLikeStreams:
    """The whole migration, encoded: the devices' digests go to ``tally``; their
    files are closed once read."""
    try:
        tally.digests = [state.digest(digest) for state in states]
        try:
            images = guest_ram(ram_size, seed, rounds=RAM_ROUNDS)
        except ValueError as error:
            raise UsageError(f"--ram {ram_size}: {error}") from None
        return qemu10_migration(
            images,
            channels=channels,
            uuid=uuid,
            devices=[_vfio_device(state) for state in states],
        )
    finally:
        for state in states:
            state.close()


def _vfio_device(state: DeviceState) -> VfioDevice:
    """The device's chunks (read into memory) and its config state."""
    chunks = tuple(bytes(state.chunk(idx)) for idx in range(state.chunks))
    return VfioDevice(state.key, chunks=chunks, config=state.config)


def _stream(data: bytes, channel: int | None, tally: SendTally) -> ChannelStream:
    def run(sock: socket.socket) -> int:
        total = send_all(sock, [data])
        if channel is not None:
            tally.channel_bytes[channel] = total
        return total

    return run


def _ram_sent(streams: QemuLikeStreams, size: int) -> RamSent:
    return RamSent(
        block=GUEST_RAM_BLOCK,
        size=size,
        rounds=RAM_ROUNDS,
        normal_pages=streams.normal_pages,
        zero_pages=streams.zero_pages,
        sync_points=streams.sync_points,
        main_bytes=len(streams.main),
    )
