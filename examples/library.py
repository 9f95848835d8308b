"""vfio-multifd as a library: a Session in your own asyncio program.

    python examples/library.py          (from the project's .venv, or with the package installed)

Builds ReceiveSettings in code, starts a Session on a free loopback port,
sends two devices to it from a thread with the package's sender, awaits the
session and inspects its SessionResult. Then it runs a second migration in
which one chunk never arrives, to show how a failure comes back: as a
MultifdError with a stable ``reason``, and with no output file left behind.
Exit status 0 when both behave as described.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from vfio_multifd import (
    Address,
    DeviceKey,
    DeviceSpec,
    MultifdError,
    ReceiveSettings,
    Session,
    SessionResult,
    logconfig,
)
from vfio_multifd.ops.status_server import query_migrate
from vfio_multifd.source.plan import SourceDevice
from vfio_multifd.source.sender import send

DEVICES = (DeviceKey("0000:00:02.0/vfio", 0), DeviceKey("0000:00:03.0/vfio", 0))


def receive_settings(directory: Path) -> ReceiveSettings:
    return ReceiveSettings(
        devices=tuple(
            DeviceSpec(key, directory / f"dev{n}.bin", directory / f"dev{n}.bin.config")
            for n, key in enumerate(DEVICES)
        ),
        listen=Address("tcp", "127.0.0.1", 0),  # port 0: the kernel picks one
        channels=3,
        fsync=False,  # a demo in a temporary directory needs no durability
        accept_timeout=10.0,
        progress_timeout=10.0,
    )


async def migrate(directory: Path, inject: str | None = None) -> SessionResult:
    """One migration: a session here, the source on a thread."""
    session = Session(receive_settings(directory))
    run = asyncio.create_task(session.run())
    listening = asyncio.create_task(session.listening.wait())
    await asyncio.wait([run, listening], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not listening.done():
        listening.cancel()
        return await run  # it failed before listening: this raises why
    assert session.address is not None
    print(f"session listening on {session.address}, status {session.status}")
    sources = [SourceDevice(key, size=(8 + 4 * n) << 20, seed=n) for n, key in enumerate(DEVICES)]
    sending = asyncio.create_task(
        asyncio.to_thread(
            send, session.address, sources, channels=3, chunk_size=1 << 20, inject=inject
        )
    )
    try:
        result = await asyncio.wait_for(run, 60)
    finally:
        # What the status socket would answer, taken from the session itself.
        info = query_migrate(session.snapshot())
        print(f"session ended {info['status']}: {info['transferred']} bytes transferred")
        await asyncio.gather(sending, return_exceptions=True)
    sent = sending.result()
    for (key, _, _, digest), device in zip(sent.devices, result.devices, strict=True):
        assert device.device == key and device.digest == digest, f"{key}: digests differ"
    return result


async def main() -> int:
    logconfig.configure(level="warning")  # the library logs with structlog; keep it quiet
    with tempfile.TemporaryDirectory(prefix="vfio-multifd-library-") as tmp:
        directory = Path(tmp)
        result = await migrate(directory)
        for device in result.devices:
            print(
                f"  {device.device}: {device.bytes} bytes in {device.chunks} chunks, "
                f"{device.digest} -> {device.data_path.name}"
            )
        print(
            f"  {result.data_bytes} bytes in {result.seconds:.3f} s ({result.mb_per_s:.0f} MB/s), "
            f"peak queued {result.peak_queued_bytes} bytes"
        )
        assert sorted(os.listdir(directory)) == [
            "dev0.bin",
            "dev0.bin.config",
            "dev1.bin",
            "dev1.bin.config",
        ]

        failing = directory / "failing"
        failing.mkdir()
        try:
            await migrate(failing, inject="missing")  # chunk 0 of the first device never comes
        except MultifdError as error:
            print(f"  failed as expected: reason {error.reason.value}: {error}")
            assert error.reason.value == "incomplete"
            assert os.listdir(failing) == [], "a failed migration leaves no file"
        else:
            print("  the broken migration completed?!", file=sys.stderr)
            return 1
    print("library: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
