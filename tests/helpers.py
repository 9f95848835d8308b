"""Helpers for tests that run a real session over loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import qemu_source as qs
import structlog

from vfio_multifd import (
    Address,
    DeviceKey,
    DeviceSpec,
    ReceiveSettings,
    Session,
    SessionResult,
    logconfig,
)

IDSTR = "0000:00:02.0/vfio"
IDSTR_B = "0000:00:03.0/vfio"


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def specs(tmp_path: Path, *keys: DeviceKey) -> tuple[DeviceSpec, ...]:
    return tuple(
        DeviceSpec(key, tmp_path / f"dev{n}.bin", tmp_path / f"dev{n}.bin.config")
        for n, key in enumerate(keys)
    )


def settings(
    tmp_path: Path,
    *keys: DeviceKey,
    channels: int = 2,
    listen: Address | None = None,
    **extra: object,
) -> ReceiveSettings:
    base = ReceiveSettings(
        devices=specs(tmp_path, *keys),
        listen=listen or Address("tcp", "127.0.0.1", 0),
        channels=channels,
        fsync=False,
        progress_timeout=30.0,
    )
    return replace(base, **extra)  # type: ignore[arg-type]


class Running:
    """A session running as a task, listening."""

    def __init__(self, session: Session, task: asyncio.Task[SessionResult]) -> None:
        self.session = session
        self.task = task

    @property
    def address(self) -> str:
        assert self.session.address is not None
        return str(self.session.address)

    async def result(self, timeout: float = 60.0) -> SessionResult:
        return await asyncio.wait_for(self.task, timeout)


async def start(config: ReceiveSettings) -> Running:
    session = Session(config)
    task = asyncio.create_task(session.run())
    listening = asyncio.create_task(session.listening.wait())
    done, _ = await asyncio.wait([task, listening], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        listening.cancel()
        task.result()  # raises the session's error
    assert listening in done, "session did not start listening"
    return Running(session, task)


async def until(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Wait (on the loop) until ``predicate()`` is true; fail the test if it is not in time."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)


def reset_logging() -> None:
    """Back to structlog's defaults, as before anything called ``logconfig.configure``
    (the command line's ``main`` does, at start-up)."""
    structlog.reset_defaults()
    logconfig._configured = None


def final_files(directory: Path) -> list[str]:
    """Names in ``directory``, temporary files included (they must not linger)."""
    return sorted(os.listdir(directory))


def assert_outputs(config: ReceiveSettings, expected: Sequence[tuple[bytes, bytes]]) -> None:
    """Each device's data and config file hold exactly the bytes sent."""
    for spec, (data, config_blob) in zip(config.devices, expected, strict=True):
        assert spec.data_path.read_bytes() == data, f"data of {spec.key} differs"
        assert spec.config_path.read_bytes() == config_blob, f"config of {spec.key} differs"


def closed_address() -> str:
    """``tcp:127.0.0.1:PORT`` where nothing listens: a connection there is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp:127.0.0.1:{sock.getsockname()[1]}"


def streams_of(per_channel: list[list[bytes]]) -> list[bytes]:
    """Channel ``n``'s stream: its handshake, then the packets ``per_channel[n]``."""
    return [qs.handshake(n) + b"".join(packets) for n, packets in enumerate(per_channel)]


def send_streams_quietly(address: str, streams: list[bytes]) -> None:
    """``qs.send_streams``, where a failing daemon may reset the channels before all
    is sent: the test looks at the daemon's error, not at the source's."""
    with contextlib.suppress(OSError):
        qs.send_streams(address, streams)


def connect(address: str) -> socket.socket:
    """A plain TCP connection to a session's ``tcp:HOST:PORT`` (10 s timeout), for hand-made streams."""
    host, _, port = address.removeprefix("tcp:").rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=10)


class FakeTransport:
    """What a ``ChannelProtocol`` needs of a transport, for tests that feed it by hand:
    it records pause/resume, and an abort closes the connection as a real one does."""

    def __init__(self, protocol: asyncio.BufferedProtocol, peer: str = "fake") -> None:
        self.protocol = protocol
        self.peer = peer
        self.reading = True
        self.aborted = False
        self.lost = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            asyncio.get_running_loop().call_soon(self.connection_lost)

    def close(self) -> None:
        self.abort()

    def is_closing(self) -> bool:
        return self.aborted

    def connection_lost(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)

    def feed(self, data: bytes) -> int:
        """Give the protocol as much of ``data`` as it reads now (as a socket would:
        nothing while paused or closed). Returns how many bytes it took."""
        done = 0
        while done < len(data) and self.reading and not self.aborted:
            buffer = self.protocol.get_buffer(len(data) - done)
            n = min(len(buffer), len(data) - done)
            buffer[:n] = data[done : done + n]
            done += n
            self.protocol.buffer_updated(n)
        return done

    def eof(self) -> bool:
        """The peer shut down its side (the protocol asks to close ours too); as a
        socket would, it is read only while reading. Returns whether it was."""
        if not self.reading or self.aborted:
            return False
        if not self.protocol.eof_received():
            self.abort()
        return True


class ChannelGate:
    """A ``send(progress=...)`` callback that holds each channel's thread after its
    ``after``-th chunk until :meth:`open`: a migration really in flight, for a test to
    look at. ``paused`` is set once all ``channels`` threads are held; ``counted`` is
    the data bytes they sent until then."""

    def __init__(self, channels: int, after: int = 5) -> None:
        self.channels = channels
        self.after = after
        self.counted = 0
        self.paused = threading.Event()
        self._gate = threading.Event()
        self._lock = threading.Lock()
        self._sent_by: dict[int, int] = {}  # chunks per channel thread

    def __call__(self, device: int, nbytes: int) -> None:
        with self._lock:
            self.counted += nbytes
            me = threading.get_ident()
            self._sent_by[me] = self._sent_by.get(me, 0) + 1
            stop = self._sent_by[me] == self.after
            sent = self._sent_by.values()
            if stop and len(self._sent_by) == self.channels and all(n >= self.after for n in sent):
                self.paused.set()
        if stop:
            self._gate.wait(30)

    def sent(self) -> int:
        with self._lock:
            return self.counted

    def open(self) -> None:
        self._gate.set()


def send_json(connection: socket.socket, message: object) -> None:
    """One JSON message as QEMU's monitor writes it, CRLF-terminated."""
    connection.sendall(json.dumps(message).encode() + b"\r\n")


def json_stream(connection: socket.socket) -> Iterator[dict[str, Any]]:
    """The JSON objects a peer sends, with or without anything between them."""
    decoder = json.JSONDecoder()
    pending = ""
    while data := connection.recv(4096):
        pending += data.decode()
        while pending.strip():
            try:
                value, end = decoder.raw_decode(pending.lstrip())
            except ValueError:
                break  # incomplete: wait for more
            pending = pending.lstrip()[end:]
            yield value
