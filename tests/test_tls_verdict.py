"""The sender's verdict over TLS (issue 20, item 1): exactly as over plaintext.

The daemon keeps every TLS channel open until the migration's outcome is
decided, then answers its ``close_notify`` with its own and a FIN only if the
outputs are in place, and resets it otherwise. ``send`` and ``replay`` exit 0
only on that clean close: a script doing ``send && destroy the source`` must
never lose a VM's device state. Real processes, or sessions in this process and the
sender's own channels, over loopback, under both loops.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import qemu_source as qs
from cli_helpers import SENDER_RESET, TRACEBACK, Daemon, one_device_daemon, run
from helpers import IDSTR, random_bytes, settings, start

from credentials import client_subject, loopback_credentials
from vfio_multifd import Address, DeviceKey, ProtocolError, Reason
from vfio_multifd.config import TlsSettings
from vfio_multifd.errors import SendError
from vfio_multifd.source.channels import StreamEnd, run_channels, send_all
from vfio_multifd.tls import load_client

SUBJECT = client_subject()
CLEAN = "the daemon closed every channel cleanly: it completed the migration"


@pytest.fixture
def tls_dirs(short_dir: Path) -> tuple[Path, Path]:
    """A server and a client credential directory of one CA: (server, client)."""
    return loopback_credentials(short_dir / "creds")


def tls_daemon(
    tmp_path: Path, daemons: list[Daemon], server: Path, *options: str
) -> tuple[Daemon, Path]:
    return one_device_daemon(
        tmp_path, daemons, 2, "--tls-creds", str(server), "--tls-authz", SUBJECT, *options
    )


def send_tls(
    address: str, client: Path, device: str, *options: str
) -> subprocess.CompletedProcess[str]:
    return run(
        ["send", "--connect", address, "--channels", "2", "--tls-creds", str(client),
         "--tls-hostname", "localhost", "--device", device, *options],
    )  # fmt: skip


DAEMON_ERRORS = {
    "missing": "missing 1 of 2 chunks (idx 0",
    "duplicate": "state buffer 0 already filled",
    "bad-config": "starts with 0x0000000000000000",
    "after-config": "came before the config state packet",
}


@pytest.mark.parametrize("inject", sorted(DAEMON_ERRORS))
def test_a_failed_tls_migration_is_exit_1_for_the_sender(
    tmp_path: Path, daemons: list[Daemon], tls_dirs: tuple[Path, Path], inject: str
) -> None:
    """It exited 0 saying the daemon completed: the daemon answered close_notify at once."""
    server, client = tls_dirs
    daemon, data = tls_daemon(tmp_path, daemons, server)
    sent = send_tls(daemon.address, client, f"idstr={IDSTR},size=2M", "--inject", inject)
    code, summary, stderr = daemon.finish()
    assert code == 1 and DAEMON_ERRORS[inject] in stderr.splitlines()[-1], stderr
    assert summary == ""
    assert sent.returncode == 1, sent.stdout + sent.stderr
    last = sent.stderr.splitlines()[-1]
    assert re.fullmatch(SENDER_RESET.format(address=re.escape(daemon.address)), last), last
    assert sent.stdout == "" and TRACEBACK not in sent.stderr
    assert os.listdir(data.parent) == []


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_a_completed_tls_migration_is_exit_0_with_the_bytes_sent(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon], tls_dirs: tuple[Path, Path], kind: str
) -> None:
    """Over a unix socket too: there the daemon's close_notify is what proves completion."""
    server, client = tls_dirs
    listen = ["--listen", f"unix:{short_dir / 'm.sock'}"] if kind == "unix" else []
    daemon, data = tls_daemon(tmp_path, daemons, server, *listen)
    source = tmp_path / "source.bin"
    source.write_bytes(random_bytes(3 * 65536 + 5, 8))
    sent = send_tls(daemon.address, client, f"idstr={IDSTR},source={source}", "--chunk-size", "64K")
    code, _, stderr = daemon.finish()
    assert code == 0, stderr
    assert sent.returncode == 0, sent.stderr
    assert data.read_bytes() == source.read_bytes()
    assert sent.stdout.splitlines()[-1].endswith(f"; {CLEAN}")


def test_a_failed_tls_migration_over_a_unix_socket_is_exit_1_for_the_sender(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon], tls_dirs: tuple[Path, Path]
) -> None:
    """A unix socket cannot carry a reset, but the missing close_notify says it failed."""
    server, client = tls_dirs
    listen = f"unix:{short_dir / 'm.sock'}"
    daemon, data = tls_daemon(tmp_path, daemons, server, "--listen", listen)
    sent = send_tls(daemon.address, client, f"idstr={IDSTR},size=2M", "--inject", "missing")
    code, _, stderr = daemon.finish()
    assert code == 1 and DAEMON_ERRORS["missing"] in stderr.splitlines()[-1], stderr
    assert sent.returncode == 1, sent.stdout + sent.stderr
    last = sent.stderr.splitlines()[-1]
    assert last.startswith("vfio-multifd: error: channel ") and "without TLS close_notify" in last
    assert sent.stdout == "" and os.listdir(data.parent) == []


def test_a_replayed_failure_over_tls_is_exit_1_for_replay(
    tmp_path: Path, daemons: list[Daemon], tls_dirs: tuple[Path, Path]
) -> None:
    """``replay`` shares the sender's channels: it exited 0 as well."""
    server, client = tls_dirs
    record = tmp_path / "rec"
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first, _ = one_device_daemon(tmp_path / "first", daemons, 2, "--record", str(record))
    sent = run(["send", "--connect", first.address, "--channels", "2", "--inject", "missing",
                "--device", f"idstr={IDSTR},size=2M"])  # fmt: skip
    assert sent.returncode == 1 and first.finish()[0] == 1, sent.stderr
    daemon, data = tls_daemon(tmp_path / "second", daemons, server)
    replayed = run(["replay", str(record), "--connect", daemon.address, "--tls-creds", str(client),
                    "--tls-hostname", "localhost"])  # fmt: skip
    code, _, stderr = daemon.finish()
    assert code == 1 and DAEMON_ERRORS["missing"] in stderr.splitlines()[-1], stderr
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    last = replayed.stderr.splitlines()[-1]
    assert re.fullmatch(SENDER_RESET.format(address=re.escape(daemon.address)), last), last
    assert "not every channel ended cleanly" in replayed.stdout
    assert os.listdir(data.parent) == []


@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_a_channel_kept_open_over_tls_waits_for_the_verdict(
    tmp_path: Path, tls_dirs: tuple[Path, Path], outcome: str
) -> None:
    """A replayed channel that was kept open sends no close_notify and waits: a reset
    (which the TLS layer reports as a ragged end) is a failure, not a clean end."""
    server, client = tls_dirs
    tls = TlsSettings(server, authz=(SUBJECT,))
    config = settings(tmp_path, DeviceKey(IDSTR, 0), channels=1, tls=tls)
    running = await start(config)
    data = random_bytes(5 * 4096 + 3, 9)
    [stream] = qs.build_streams([(IDSTR, 0, data, b"cfg")], 1, chunk_size=4096)
    if outcome == "failed":
        stream = qs.handshake(0) + b"\x12\x34\x56\x78" + bytes(300)  # a wrong magic
    address = Address.parse(running.address)

    def keep_open() -> list[int]:
        return run_channels(
            address, [lambda sock: send_all(sock, [stream])], 10.0,
            tls=load_client(client, address), ends=[StreamEnd.KEEP_OPEN],
        )  # fmt: skip

    if outcome == "completed":
        assert await asyncio.to_thread(keep_open) == [len(stream)]
        await running.result()
        assert config.devices[0].data_path.read_bytes() == data
    else:
        with pytest.raises(SendError) as failure:
            await asyncio.to_thread(keep_open)
        assert failure.value.reason is Reason.CHANNEL_RESET, failure.value
        with pytest.raises(ProtocolError):
            await running.result()
        assert not config.devices[0].data_path.exists()


async def test_a_source_that_ends_after_the_daemon_completed_hears_success(
    tmp_path: Path, tls_dirs: tuple[Path, Path]
) -> None:
    """The daemon completes once every device is, without waiting for close_notify:
    a source whose close_notify comes after the daemon hung up (and draws a reset
    from its kernel) has the daemon's close_notify and FIN first, and succeeds."""
    server, client = tls_dirs
    config = settings(tmp_path, DeviceKey(IDSTR, 0), tls=TlsSettings(server, authz=(SUBJECT,)))
    running = await start(config)
    data = random_bytes(7 * 4096 + 1, 10)
    streams = qs.build_streams([(IDSTR, 0, data, b"cfg")], 2, chunk_size=4096)
    completed = threading.Event()

    def late(stream: bytes) -> Callable[[socket.socket], int]:
        def send(sock: socket.socket) -> int:
            sent = send_all(sock, [stream])
            assert completed.wait(10), "the daemon did not complete"
            return sent

        return send

    address = Address.parse(running.address)
    tls = load_client(client, address)
    sending = asyncio.to_thread(run_channels, address, [late(s) for s in streams], 10.0, tls=tls)
    sender = asyncio.create_task(sending)
    await running.result()
    completed.set()
    assert await sender == [len(s) for s in streams]
    assert config.devices[0].data_path.read_bytes() == data
