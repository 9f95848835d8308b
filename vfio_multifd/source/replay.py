"""``vfio-multifd replay DIR``: a recording's channels sent again, byte for byte.

A recording (``receive --record DIR``, see ``recorder.py``) holds each accepted
channel's bytes exactly as the daemon received them, handshake first. The
replay checks every file against its size and digest in the manifest before
it sends a byte, opens one connection per recorded channel, in the order asked
for (``recorded``: by first byte received; ``reverse``; ``random`` with a
seed), sends each file verbatim, and ends each connection as the recorded one
ended: a clean end of stream (``eof``), a reset once the daemon has the bytes
(``lost``), or nothing, waiting for the daemon to hang up (``open``: the daemon
decided the outcome before the source ended it). A daemon cannot tell a
replay from the original; the same daemon options (``--channels``,
``--uuid``, the devices) then give the same files, or the same error.

In the recorded order the replay also keeps what the manifest knows of the
interleaving: no channel sends its first byte, nor its last (which completes
whatever the daemon read last on it), before the moment the recording noted
for it, counted from the earliest; the gaps between these moments are kept up
to :data:`MAX_GAP`, so a replay takes little longer than its sending. A
recorded failure then fails the same way: the channel whose header the daemon
refused sends it after the packets it collided with.

The connections are the sender's own (``sender.run_channels``: connect with
retries, one thread each, the daemon's verdict from how it closes), and so
are the exit codes: 0 the daemon closed every channel cleanly, 1 a
connection failed or was reset. Once every byte is sent the replay waits at
most ``verdict_timeout`` seconds for the verdict, then resets its channels
and reports :attr:`Reason.NO_VERDICT` (exit 3). Refused connections
(``refused-<n>.bin``) are not replayed.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..config import Address, Digest
from ..digest import format_digest, new_hasher
from ..errors import Reason, SendError, UsageError, os_error_text
from ..ops.manifest import (
    MANIFEST_NAME,
    ChannelEnd,
    Manifest,
    ManifestError,
    RecordedChannel,
    channel_name,
)
from .channels import ChannelStream, StreamEnd, reset_on_close, run_channels

if TYPE_CHECKING:
    from ..tls import TlsClient

ORDERS = ("recorded", "reverse", "random")
#: Bytes per sendfile call: what a stop (another channel failed, SIGINT) waits for at most.
SEND_BLOCK = 1 << 20
#: The longest pause kept between two recorded moments (a channel's first or last byte).
MAX_GAP = 0.1
#: How long the replay waits for the daemon's verdict once every byte is sent (seconds).
VERDICT_TIMEOUT = 60.0

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
            _check_file(directory / channel.file, channel, manifest.complete)
        return cls(directory, manifest)


def _check_file(file: Path, channel: RecordedChannel, complete: bool) -> None:
    """``file`` holds what channel ``channel`` recorded: its size and digest (read whole)."""
    try:
        # O_NONBLOCK: a FIFO put there is refused below rather than waited on.
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if channel.bytes or complete:
            raise UsageError(f"{channel_name(channel.id)}: {file} is missing") from None
        return  # a recording that stopped before the file could be created
    except OSError as error:
        raise UsageError(f"{channel_name(channel.id)}: {file}: {os_error_text(error)}") from None
    with open(fd, "rb") as stream:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise UsageError(f"{channel_name(channel.id)}: {file} is not a regular file")
            if info.st_size != channel.bytes:
                raise UsageError(
                    f"{channel_name(channel.id)}: {file} holds {info.st_size} bytes, the manifest says "
                    f"{channel.bytes}: it changed since it was recorded"
                )
            algorithm = Digest(channel.digest.partition(":")[0])  # the manifest checked it
            hasher = new_hasher(algorithm)
            block = bytearray(SEND_BLOCK)
            while count := stream.readinto(block):
                hasher.update(memoryview(block)[:count])
        except OSError as error:
            raise UsageError(
                f"{channel_name(channel.id)}: {file}: {os_error_text(error)}"
            ) from None
    actual = format_digest(algorithm, hasher)
    if actual != channel.digest:
        raise UsageError(
            f"{channel_name(channel.id)}: {file} is not what was recorded: its digest is {actual}, "
            f"the manifest says {channel.digest}"
        )


def connection_order(
    channels: Sequence[RecordedChannel], order: str, seed: int = 0
) -> list[RecordedChannel]:
    """The order to connect the channels in: ``recorded`` (by first byte received,
    then id, the main channel first), its ``reverse``, or a ``random`` shuffle of it
    drawn from ``seed``."""
    recorded = sorted(
        channels,
        key=lambda c: (c.first_byte_s is None, c.first_byte_s or 0.0, -1 if c.id is None else c.id),
    )
    if order == "reverse":
        return recorded[::-1]
    if order == "random":
        random.Random(seed).shuffle(recorded)
        return recorded
    if order != "recorded":
        raise UsageError(f"unknown --channels-order {order!r} (one of {', '.join(ORDERS)})")
    return recorded


def timing(
    channels: Sequence[RecordedChannel], max_gap: float = MAX_GAP
) -> list[tuple[float, float]]:
    """When each channel may send its first byte and its last, in seconds after the
    replay's start: every recorded first and last byte in its recorded order, the gap
    from one to the next kept up to ``max_gap`` (a channel without times: at once)."""
    moments = sorted(
        {t for c in channels for t in (c.first_byte_s, c.last_byte_s) if t is not None}
    )
    at: dict[float | None, float] = {None: 0.0}
    replayed = 0.0
    for previous, moment in zip([None, *moments], moments, strict=False):
        if previous is not None:
            replayed += min(moment - previous, max_gap)
        at[moment] = replayed
    return [(at[c.first_byte_s], at[c.last_byte_s]) for c in channels]


class Replay:
    """One replay of a recording: the connection order and timing, and what each channel
    sent (written by each channel's own thread, read once they are done)."""

    def __init__(
        self,
        recording: Recording,
        order: str = "recorded",
        seed: int = 0,
        *,
        verdict_timeout: float = VERDICT_TIMEOUT,
    ) -> None:
        self.recording = recording
        self.channels = connection_order(recording.manifest.recorded_channels, order, seed)
        # Another order tests that the daemon does not depend on it: no recorded timing.
        recorded = order == "recorded"
        self.times = timing(self.channels) if recorded else [(0.0, 0.0)] * len(self.channels)
        self.verdict_timeout = verdict_timeout
        self.sent = [0] * len(self.channels)
        self.seconds = 0.0
        # One run's state, shared by the channels' threads and the verdict timer.
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._origin: float | None = None  # monotonic: when the first channel started
        self._socks: list[socket.socket] = []
        self._done = 0  # channels that sent what they had
        self._timer: threading.Timer | None = None
        self._over = False  # run_channels returned: the timer has nothing left to stop
        self._timed_out = False

    @property
    def total(self) -> int:
        return sum(channel.bytes for channel in self.channels)

    def run(
        self, address: Address, *, connect_timeout: float = 30.0, tls: TlsClient | None = None
    ) -> SendError | None:
        """Send every channel; ``None`` once the daemon closed them all cleanly, else
        the first channel's error (:class:`SendError`, naming it by its recorded id), or
        :attr:`Reason.NO_VERDICT` if it gave none within ``verdict_timeout`` of the last byte."""
        started = time.monotonic()
        try:
            run_channels(
                address,
                [self._stream(n) for n in range(len(self.channels))],
                connect_timeout,
                stop=self._stop,
                tls=tls,
                channel_ids=[channel.id for channel in self.channels],
                ends=[STREAM_END[channel.end] for channel in self.channels],
            )
        except SendError as error:
            return error
        finally:
            self.seconds = time.monotonic() - started
            with self._lock:
                self._over = True
                if self._timer is not None:
                    self._timer.cancel()
        if self._timed_out:  # what run_channels saw after the timer reset the channels
            return SendError(
                Reason.NO_VERDICT,
                f"{address}: the daemon gave no verdict within {self.verdict_timeout:g} s "
                "(--verdict-timeout) after the last byte was sent: the replay reset its "
                "channels (the daemon's log says what it was waiting for)",
            )
        return None

    def _stream(self, n: int) -> ChannelStream:
        channel = self.channels[n]
        path = self.recording.directory / channel.file

        def send(sock: socket.socket) -> int:
            with self._lock:
                self._socks.append(sock)
                if self._origin is None:
                    self._origin = time.monotonic()
            if channel.bytes:  # else its file may not exist (a recording that stopped early)
                with open(path, "rb") as file:
                    # The last byte apart: it completes what the daemon read last.
                    first, last = self.times[n]
                    for upto, due in ((channel.bytes - 1, first), (channel.bytes, last)):
                        if not self._wait_until(due):
                            return self.sent[n]
                        self._send(sock, file, n, upto)
            self._sent_everything()
            return self.sent[n]

        return send

    def _send(self, sock: socket.socket, file: BinaryIO, n: int, upto: int) -> None:
        """Send channel ``n``'s file up to byte ``upto`` (less if the file is shorter)."""
        while self.sent[n] < upto and not self._stop.is_set():
            # Zero-copy over plain sockets; the offset is the file's, not the position.
            count = sock.sendfile(file, self.sent[n], min(SEND_BLOCK, upto - self.sent[n]))
            if not count:
                break
            self.sent[n] += count

    def _wait_until(self, due: float) -> bool:
        """Wait until ``due`` seconds after the first channel started; False if stopped."""
        assert self._origin is not None
        return not self._stop.wait(max(0.0, self._origin + due - time.monotonic()))

    def _sent_everything(self) -> None:
        """One more channel sent all it had; after the last, the verdict timer starts."""
        with self._lock:
            self._done += 1
            if self._done < len(self.channels) or self._over:
                return
            self._timer = threading.Timer(self.verdict_timeout, self._no_verdict)
            self._timer.daemon = True
            self._timer.start()

    def _no_verdict(self) -> None:
        """The verdict timer expired: reset every channel, and wake those waiting."""
        with self._lock:
            if self._over:
                return
            self._timed_out = True
        self._stop.set()  # run_channels takes what follows as our own stop, not an error
        for sock in self._socks:
            reset_on_close(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
