"""``vfio-multifd replay DIR``: a recording's channels sent again, byte for byte.

A recording (``receive --record DIR``, see ``recorder.py``) holds each accepted
channel's bytes exactly as the daemon received them, handshake first. The
replay opens one connection per recorded channel, in the order asked for
(``recorded``: by first byte received; ``reverse``; ``random`` with a seed),
sends each file verbatim, and ends each connection as the recorded one
ended: a clean end of stream (``eof``), a reset once the daemon has the bytes
(``lost``), or nothing, waiting for the daemon to hang up (``open``: the daemon
decided the outcome before the source ended it). A daemon cannot tell a
replay from the original; the same daemon options (``--channels``,
``--uuid``, the devices) then give the same files, or the same error.

The connections are the sender's own (``sender.run_channels``: connect with
retries, one thread each, the daemon's verdict from how it closes), and so
are the exit codes: 0 the daemon closed every channel cleanly, 1 a
connection failed or was reset. Refused connections (``refused-<n>.bin``)
are not replayed.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Address
from .errors import SendError, UsageError, os_error_text
from .manifest import MANIFEST_NAME, ChannelEnd, Manifest, ManifestError, RecordedChannel
from .sender import ChannelStream, StreamEnd, run_channels

if TYPE_CHECKING:
    from .tls import TlsClient

ORDERS = ("recorded", "reverse", "random")
#: Bytes per sendfile call: what a stop (another channel failed, SIGINT) waits for at most.
SEND_BLOCK = 1 << 20

#: How a replayed channel ends, by how the recorded one ended.
STREAM_END = {
    ChannelEnd.EOF: StreamEnd.CLOSE,
    ChannelEnd.LOST: StreamEnd.RESET,
    ChannelEnd.OPEN: StreamEnd.KEEP_OPEN,
}
#: What each ending is called in the replay's report.
ENDING_TEXT = {
    ChannelEnd.EOF: "then ended its stream",
    ChannelEnd.LOST: "then reset the connection",
    ChannelEnd.OPEN: "then kept the connection open",
}


@dataclass(frozen=True, slots=True)
class Recording:
    """A recording directory whose manifest and channel files were checked."""

    directory: Path
    manifest: Manifest

    @classmethod
    def load(cls, directory: Path) -> Recording:
        """Read and check ``DIR/manifest.json`` and every channel file it names;
        a :class:`UsageError` says what is wrong."""
        path = directory / MANIFEST_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(
                f"{directory} is not a recording: it has no {MANIFEST_NAME} (receive --record "
                "DIR writes it when the migration ends; a daemon killed with SIGKILL leaves none)"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            why = os_error_text(error) if isinstance(error, OSError) else str(error)
            raise UsageError(f"cannot read {path}: {why}") from None
        try:
            manifest = Manifest.from_json(text)
        except ManifestError as error:
            raise UsageError(f"{path}: {error}") from None
        if not manifest.recorded_channels:
            raise UsageError(f"{path}: no channel was recorded: there is nothing to replay")
        for channel in manifest.recorded_channels:
            file = directory / channel.file
            try:
                size = file.stat().st_size
            except FileNotFoundError:
                if channel.bytes or manifest.complete:
                    raise UsageError(f"channel {channel.id}: {file} is missing") from None
                size = 0  # a recording that stopped before the file could be created
            except OSError as error:
                raise UsageError(f"channel {channel.id}: {file}: {os_error_text(error)}") from None
            if size != channel.bytes:
                raise UsageError(
                    f"channel {channel.id}: {file} holds {size} bytes, the manifest says "
                    f"{channel.bytes}: it changed since it was recorded"
                )
        return cls(directory, manifest)


def connection_order(
    channels: Sequence[RecordedChannel], order: str, seed: int = 0
) -> list[RecordedChannel]:
    """The order to connect the channels in: ``recorded`` (by first byte received,
    then id), its ``reverse``, or a ``random`` shuffle of it drawn from ``seed``."""
    recorded = sorted(
        channels,
        key=lambda c: (c.first_byte_s is None, c.first_byte_s or 0.0, c.id),
    )
    if order == "reverse":
        return recorded[::-1]
    if order == "random":
        random.Random(seed).shuffle(recorded)
        return recorded
    if order != "recorded":
        raise UsageError(f"unknown --channels-order {order!r} (one of {', '.join(ORDERS)})")
    return recorded


class Replay:
    """One replay of a recording: the connection order, and what each channel sent
    (written by each channel's own thread, read once they are done)."""

    def __init__(self, recording: Recording, order: str = "recorded", seed: int = 0) -> None:
        self.recording = recording
        self.channels = connection_order(recording.manifest.recorded_channels, order, seed)
        self.sent = [0] * len(self.channels)
        self.seconds = 0.0

    @property
    def total(self) -> int:
        return sum(channel.bytes for channel in self.channels)

    def run(
        self, address: Address, *, connect_timeout: float = 30.0, tls: TlsClient | None = None
    ) -> SendError | None:
        """Send every channel; ``None`` once the daemon closed them all cleanly, else
        the first channel's error (:class:`SendError`, naming it by its recorded id)."""
        stop = threading.Event()
        started = time.monotonic()
        try:
            run_channels(
                address,
                [self._stream(n, stop) for n in range(len(self.channels))],
                connect_timeout,
                stop=stop,
                tls=tls,
                channel_ids=[channel.id for channel in self.channels],
                ends=[STREAM_END[channel.end] for channel in self.channels],
            )
        except SendError as error:
            return error
        finally:
            self.seconds = time.monotonic() - started
        return None

    def _stream(self, n: int, stop: threading.Event) -> ChannelStream:
        path = self.recording.directory / self.channels[n].file

        def send(sock: socket.socket) -> int:
            if not self.channels[n].bytes:
                return 0  # its file may not exist (a recording that stopped early)
            with open(path, "rb") as file:
                while not stop.is_set():
                    # Zero-copy over plain sockets; the offset is the file's, not the position.
                    count = sock.sendfile(file, offset=self.sent[n], count=SEND_BLOCK)
                    if not count:
                        break
                    self.sent[n] += count
            return self.sent[n]

        return send
