"""Helpers for tests that run a real session over loopback sockets."""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from vfio_multifd import Address, DeviceKey, DeviceSpec, ReceiveSettings, Session, SessionResult

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


def final_files(directory: Path) -> list[str]:
    """Names in ``directory``, temporary files included (they must not linger)."""
    return sorted(os.listdir(directory))


def assert_outputs(config: ReceiveSettings, expected: Sequence[tuple[bytes, bytes]]) -> None:
    """Each device's data and config file hold exactly the bytes sent."""
    for spec, (data, config_blob) in zip(config.devices, expected, strict=True):
        assert spec.data_path.read_bytes() == data, f"data of {spec.key} differs"
        assert spec.config_path.read_bytes() == config_blob, f"config of {spec.key} differs"


def connect(address: str) -> socket.socket:
    """A plain TCP connection to a session's ``tcp:HOST:PORT`` (10 s timeout), for hand-made streams."""
    host, _, port = address.removeprefix("tcp:").rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=10)
