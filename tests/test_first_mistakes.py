"""Mistakes a newcomer makes in the first hour, each answered at once by a message
that names what to change, without log lines that mislead: two daemons on one
path, a path where no file can be made, an unknown device, a usage error, a
Ctrl-C that reaches a failing daemon, a channel that comes after a failure."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
import qemu_source as qs
import structlog
from cli_helpers import Daemon, receiver, run_in_process
from helpers import IDSTR, FakeTransport, settings, start

from vfio_multifd.core.reassembly import ReassemblyBuffer
from vfio_multifd.core.wire import DeviceKey
from vfio_multifd.errors import ProtocolError, Reason, SessionError

A = DeviceKey(IDSTR, 0)


def test_a_second_daemon_on_the_same_data_path_is_refused_naming_the_first(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    first, out = receiver(tmp_path, daemons, "--channels", "1")
    data = out / "a.bin"
    second = run_in_process(["receive", "--listen", "tcp:127.0.0.1:0", "--log-format", "json",
                             "--device", f"idstr={IDSTR},data={data}"])  # fmt: skip
    assert second.returncode == 2, second.stderr
    assert second.stderr.splitlines() == [
        f"vfio-multifd: error: device {IDSTR}: data file {data}: another vfio-multifd receive "
        f"is writing it (pid {first.proc.pid}, holding {out / '.a.bin.lock'}); give each "
        "daemon paths of its own"
    ]
    # The first goes on, and leaves no lock file once done.
    streams = qs.build_streams([(IDSTR, 0, b"x" * 5000, b"c")], 1, chunk_size=4096)
    qs.send_streams(first.address, streams)
    code, _, stderr = first.finish()
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["a.bin", "a.bin.config"]
    assert data.read_bytes() == b"x" * 5000


def test_a_path_in_a_directory_that_takes_no_new_file_says_so(tmp_path: Path) -> None:
    """data=/proc/version was answered "No such file or directory"."""
    if not Path("/proc/version").is_file():
        pytest.skip("no /proc/version here")
    done = run_in_process(["receive", "--listen", "tcp:127.0.0.1:0", "--log-format", "json",
                           "--device", "idstr=a,data=/proc/version"])  # fmt: skip
    assert done.returncode == 2
    # A usage error: no state_change line before it (no migration had started).
    assert done.stderr.splitlines() == [
        "vfio-multifd: error: device a: cannot write data file /proc/version: no new file can "
        "be created in /proc (the kernel answers ENOENT, errno 2), and a file is written "
        "beside its path, then renamed over it: give a path in a directory where files can "
        "be created"
    ]


def test_a_usage_error_found_by_the_session_logs_no_state_change(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_in_process(["receive", "--listen", f"tcp:127.0.0.1:{port}", "--log-format",
                               "json", "--device", f"idstr=a,data={tmp_path / 'a.bin'}"])  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"vfio-multifd: error: cannot listen on tcp:127.0.0.1:{port}: Address already in use"
    ]


def test_an_unknown_device_lists_the_idstr_and_instance_pairs_expected() -> None:
    """It listed idstrs alone: a wrong instance looked like a right device."""
    buffer = ReassemblyBuffer([A, DeviceKey("0000:00:03.0/vfio", 1)])
    with pytest.raises(ProtocolError) as caught:
        buffer.device(DeviceKey(IDSTR, 7), 3)
    assert caught.value.reason is Reason.UNKNOWN_DEVICE
    assert caught.value.message == (
        f"unknown device (idstr '{IDSTR}', instance 7) in state buffer 3; expected one of (the "
        f"--device idstr= and instance= given): (idstr '{IDSTR}', instance 0), "
        "(idstr '0000:00:03.0/vfio', instance 1)"
    )


def infos(logs: list[dict[str, object]], event: str) -> list[dict[str, object]]:
    return [e for e in logs if e["event"] == event and e["log_level"] != "debug"]


async def test_a_signal_to_a_daemon_already_failing_logs_no_cancel_ignored(
    tmp_path: Path,
) -> None:
    """One Ctrl-C reaches a sender and its daemon: the sender's resets fail the migration
    first, and the cancel that follows is no news."""
    running = await start(settings(tmp_path, A))
    with structlog.testing.capture_logs() as logs:
        running.session.fail(SessionError(Reason.INCOMPLETE, "the source went away"))
        running.session.cancel("cancelled by SIGINT", signal_number=2)
        with pytest.raises(SessionError):
            await running.result()
    assert infos(logs, "cancel_ignored") == []
    assert running.session.status.value == "failed"


async def test_a_channel_refused_once_the_migration_failed_is_not_a_warning(
    tmp_path: Path,
) -> None:
    running = await start(settings(tmp_path, A, channels=2))
    session = running.session
    with structlog.testing.capture_logs() as logs:
        session.fail(SessionError(Reason.INCOMPLETE, "the source went away"))
        late = session.connection("late")
        transport = FakeTransport(late)
        late.connection_made(transport)  # type: ignore[arg-type]
        transport.feed(qs.handshake(1))
        assert session.core.connections.refused_count == 1 and transport.aborted
        with pytest.raises(SessionError):
            await running.result()
        await asyncio.sleep(0)
    assert infos(logs, "channel_refused") == []
    assert session.core.connections.late_count == 1
