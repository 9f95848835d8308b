"""The replay sender: each channel's pre-built stream on its own connection and thread.

It is the sender's ``run_channels`` (connect every channel, one thread each,
wait for the receiver to close) with a stream that only ``sendmsg``-s the
workload's batches, so it costs every receiver the same. With ``tls`` (a
loaded client credential directory) each socket does its TLS handshake
first and the same buffers go out with ``sendall`` of the TLS socket (it has
no ``sendmsg``), ending with ``close_notify``. Each stream notes
the wall-clock time its first batch went out and its last ``sendmsg``
returned, which a receiver's own log times can be set against.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from vfio_multifd.config import Address
from vfio_multifd.source.channels import ChannelStream, run_channels, send_all
from vfio_multifd.tls import TlsClient
from workload import Workload


@dataclass(frozen=True)
class Replay:
    started: float  # wall clock: the first channel began sending
    sent: float  # wall clock: the last channel's last sendmsg returned
    channel_bytes: list[int]


def replay(
    address: Address, workload: Workload, timeout: float, tls: TlsClient | None = None
) -> Replay:
    """Send ``workload`` to ``address``; returns once the receiver closed every channel."""
    started = [0.0] * workload.channels
    sent = [0.0] * workload.channels

    def stream(channel: int) -> ChannelStream:
        def run(sock: socket.socket) -> int:
            started[channel] = time.time()
            total = sum(send_all(sock, batch) for batch in workload.streams[channel])
            sent[channel] = time.time()
            return total

        return run

    streams = [stream(c) for c in range(workload.channels)]
    channel_bytes = run_channels(address, streams, timeout, tls=tls)
    return Replay(min(started), max(sent), channel_bytes)
