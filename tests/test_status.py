"""Status socket, readiness and logs: what a daemon shows to the outside.

In-process tests run a real session and its status server in one event loop
(under both loops) with the sender on threads; the CLI tests run the daemon as
a subprocess. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import qemu_source as qs
import structlog
from cli_helpers import (
    TOOL,
    TRACEBACK,
    Daemon,
    part_files,
    partial_stream,
    receive_usage_error,
    run,
    run_in_process,
    wait_for,
    with_event_loop,
)
from helpers import IDSTR, IDSTR_B, ChannelGate, final_files, settings, start

from vfio_multifd import Address, Cancelled, DeviceKey, ProtocolError, UsageError, logconfig
from vfio_multifd.ops.notify import sd_notify
from vfio_multifd.ops.status_client import query
from vfio_multifd.ops.status_server import StatusServer, query_migrate
from vfio_multifd.source.plan import SourceDevice
from vfio_multifd.source.sender import send

A = DeviceKey(IDSTR, 0)
B = DeviceKey(IDSTR_B, 0)
Reply = dict[str, Any]


class Client:
    """One QMP connection to a status socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.events: list[Reply] = []

    @classmethod
    async def open(cls, path: Path) -> tuple[Client, Reply]:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
        client = cls(reader, writer)
        return client, await client.read()

    async def read(self) -> Reply:
        """The next reply; QMP events (the daemon's MIGRATION, on each status change)
        are kept in ``events``, as a QMP client sets them aside."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 5)
            assert line.endswith(b"\r\n"), line
            reply: Reply = json.loads(line)
            if "event" not in reply:
                return reply
            self.events.append(reply)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def execute(self, command: str, **extra: object) -> Reply:
        await self.send_raw(json.dumps({"execute": command, **extra}).encode() + b"\n")
        return await self.read()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def query_migrate_over(path: Path) -> Reply:
    client, _ = await Client.open(path)
    try:
        reply = await client.execute("query-migrate")
    finally:
        await client.close()
    info: Reply = reply["return"]
    return info


# -- in process: a real transfer watched over the socket ---------------------------


async def test_status_fields_move_during_a_transfer_then_completed(
    tmp_path: Path, short_dir: Path
) -> None:
    sizes = (4 << 20, (2 << 20) + 1000)
    config = settings(tmp_path, A, B, channels=3)
    running = await start(config)
    path = short_dir / "status.sock"
    # Each channel's thread stops after its fifth chunk, until the gate opens.
    progress = ChannelGate(channels=3, after=5)

    async with StatusServer(running.session, path):
        before = await query_migrate_over(path)
        devices = [
            SourceDevice(A, size=sizes[0], seed=1),
            SourceDevice(B, size=sizes[1], seed=2),
        ]
        sending = asyncio.create_task(
            asyncio.to_thread(
                send,
                Address.parse(running.address),
                devices,
                channels=3,
                chunk_size=65536,
                order="random",
                progress=progress,
            )
        )
        try:
            assert await asyncio.to_thread(progress.paused.wait, 20), "the sender never paused"
            out = progress.sent()
            # Everything the paused sender has sent: 3 handshakes and 5 whole packets
            # per channel (their headers too), every packet decoded.
            arrived = 3 * 64 + 15 * (288 + 65536)
            deadline = time.monotonic() + 10
            while True:
                during = await query_migrate_over(path)
                if (
                    during["transferred"] == arrived
                    and [c["packets"] for c in during["channels"]] == [5, 5, 5]
                    and any(d["bytes-written"] for d in during["devices"])
                ):
                    break
                assert during["transferred"] <= arrived, during
                assert time.monotonic() < deadline, during
                await asyncio.sleep(0.01)
        finally:
            progress.open()
        sent = await asyncio.wait_for(sending, 60)
        result = await running.result()
        after = await query_migrate_over(path)  # the server outlives the session
    assert not path.exists()

    assert before["status"] == "setup"
    assert (before["total-time"], before["transferred"], before["mbps"]) == (0, 0, 0.0)
    assert before["channels"] == []
    assert [d["next-idx"] for d in before["devices"]] == [0, 0]
    assert all("last-idx" not in d for d in before["devices"])
    assert "error-desc" not in before

    assert during["status"] == "active"
    assert out == 15 * 65536  # data bytes the paused sender had sent
    assert out < during["transferred"] < sent.bytes_sent
    assert during["mbps"] > 0
    assert [c["id"] for c in during["channels"]] == [0, 1, 2]
    assert [(c["state"], c["packets"]) for c in during["channels"]] == [("active", 5)] * 3
    assert sum(c["bytes"] for c in during["channels"]) == during["transferred"]
    assert any(d["next-idx"] > 0 for d in during["devices"])
    assert not any(d["complete"] for d in during["devices"])

    assert after["status"] == "completed"
    assert after["transferred"] == sent.bytes_sent == result.bytes_received
    assert after["total-time"] >= round(result.seconds * 1000) > 0
    assert after["queued-bytes"] == 0
    chunks = [-(-size // 65536) for size in sizes]
    for info, size, n, key in zip(after["devices"], sizes, chunks, (A, B), strict=True):
        assert info["device"] == str(key)
        assert info["bytes-written"] == size
        assert (info["next-idx"], info["last-idx"]) == (n + 1, n)
        assert (info["queued-bytes"], info["queued-chunks"], info["complete"]) == (0, 0, True)
    assert [(c["id"], c["state"]) for c in after["channels"]] == [
        (0, "closed"),
        (1, "closed"),
        (2, "closed"),
    ]
    assert sum(c["packets"] for c in after["channels"]) == sum(chunks) + 2


async def test_qmp_conversation(tmp_path: Path, short_dir: Path) -> None:
    running = await start(settings(tmp_path, A, channels=1))
    path = short_dir / "status.sock"
    try:
        async with StatusServer(running.session, path):
            assert path.stat().st_mode & 0o777 == 0o600
            client, greeting = await Client.open(path)
            assert greeting["QMP"]["capabilities"] == []
            assert await client.execute("qmp_capabilities") == {"return": {}}
            reply = await client.execute("query-migrate", id="q1")
            assert reply["id"] == "q1" and reply["return"]["status"] == "setup"
            assert reply["return"]["address"] == running.address
            unknown = await client.execute("migrate", id=7)
            assert unknown == {
                "error": {
                    "class": "CommandNotFound",
                    "desc": "The command migrate has not been found",
                },
                "id": 7,
            }
            commands = await client.execute("query-commands")
            assert {c["name"] for c in commands["return"]} >= {"query-migrate", "migrate_cancel"}
            # Byte by byte, then two commands in one write, then garbage.
            for byte in b'{"execute": "query-migrate", "id": 2}':
                await client.send_raw(bytes([byte]))
            assert (await client.read())["id"] == 2
            await client.send_raw(
                b'{"execute":"qmp_capabilities","id":3} {"execute":"qmp_capabilities","id":4}\n'
            )
            assert [(await client.read())["id"] for _ in range(2)] == [3, 4]
            await client.send_raw(b"this is not json\n")
            assert (await client.read())["error"]["class"] == "GenericError"
            # As QEMU's monitor: a request framed by its JSON, not by lines, whatever
            # lines it spans and however many reads it takes (issue 20 item 12).
            await client.send_raw(b'{"execute":\n')
            await asyncio.sleep(0.05)  # the server reads this half on its own
            await client.send_raw(b' "query-migrate",\r\n "id": [5,\n"}{"]}')
            reply = await client.read()
            assert "id" in reply, reply
            assert (reply["id"], reply["return"]["status"]) == ([5, "}{"], "setup")
            await client.send_raw(b'{"execute": "query-commands",\n "id": "x\\"{"}\n')
            assert (await client.read())["id"] == 'x"{'
            await client.send_raw(b'{"execute":\n oops}  {"execute": "qmp_capabilities", "id": 6}')
            bad = await client.read()
            assert bad["error"]["class"] == "GenericError", bad
            assert bad["error"]["desc"].startswith("JSON parse error"), bad
            assert await client.read() == {"return": {}, "id": 6}  # the next one is read
            await client.send_raw(b'["execute"]\n')
            assert (await client.read())["error"]["class"] == "GenericError"
            assert (await client.execute("query-migrate"))["return"]["status"] == "setup"
            # A client that is still connected when the server closes is let go.
        await asyncio.wait_for(client.reader.read(), 5)
        await client.close()
        assert not path.exists()
    finally:
        running.session.cancel()
        with pytest.raises(Cancelled):
            await running.result()


async def status_command(path: Path) -> tuple[int, str]:
    """``vfio-multifd status --json`` run while this loop serves the socket: its exit
    code and the status it printed."""
    proc = await asyncio.create_subprocess_exec(
        *TOOL, "status", "--socket", str(path), "--json",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None and not err, err
    return proc.returncode, json.loads(out)["status"]


async def test_migrate_cancel_in_process(tmp_path: Path, short_dir: Path) -> None:
    config = settings(tmp_path, A, channels=2)
    running = await start(config)
    path = short_dir / "status.sock"
    async with StatusServer(running.session, path):
        socks = await asyncio.to_thread(
            partial_stream, running.address, channels=2, chunks=2, chunk_size=4096
        )
        try:
            deadline = time.monotonic() + 10
            while (info := await query_migrate_over(path))["devices"][0]["next-idx"] < 2:
                assert time.monotonic() < deadline, info
                await asyncio.sleep(0.01)
            client, _ = await Client.open(path)
            assert await client.execute("qmp_capabilities") == {"return": {}}  # events after it
            assert await client.execute("migrate_cancel", id="c") == {"return": {}, "id": "c"}
            with pytest.raises(Cancelled, match="cancelled by migrate_cancel") as raised:
                await running.result()
            assert raised.value.signal_number is None
            info = (await client.execute("query-migrate"))["return"]
            await client.close()
            # QEMU's MIGRATION event for each change, after the answer to migrate_cancel.
            assert [e["event"] for e in client.events] == ["MIGRATION"] * 2
            assert [e["data"]["status"] for e in client.events] == ["cancelling", "cancelled"]
            # The final one carries the figures at the end: the daemon exits right after.
            assert "info" not in client.events[0]["data"]
            final = client.events[1]["data"]["info"]
            assert final["status"] == "cancelled"
            assert final["devices"][0]["bytes-written"] == 2 * 4096
            assert final["total-time"] == info["total-time"]  # the clock stopped there
            assert await status_command(path) == (1, "cancelled")
        finally:
            for sock in socks:
                sock.close()
    assert info["status"] == "cancelled"
    assert "error-desc" not in info
    assert final_files(tmp_path) == []


async def test_failed_status_has_error_desc(tmp_path: Path, short_dir: Path) -> None:
    running = await start(settings(tmp_path, A, channels=1))
    path = short_dir / "status.sock"
    packet = qs.device_packet(IDSTR, 0, 0, b"x" * 100)
    stream = qs.handshake(0) + packet + packet
    async with StatusServer(running.session, path):
        await asyncio.to_thread(qs.send_streams, running.address, [stream])
        with pytest.raises(ProtocolError):
            await running.result()
        info = await query_migrate_over(path)
        # `vfio-multifd status` tells the outcome by its exit code, as --watch does
        assert await status_command(path) == (1, "failed")
    assert info["status"] == "failed"
    assert info["error-desc"] == f"channel 0: device {IDSTR}: state buffer 0 already filled"
    assert info["channels"][0]["state"] == "failed"


async def test_stale_socket_is_replaced_but_a_file_is_not(tmp_path: Path, short_dir: Path) -> None:
    running = await start(settings(tmp_path, A, channels=1))
    try:
        stale = short_dir / "stale.sock"
        with socket.socket(socket.AF_UNIX) as old:
            old.bind(str(stale))  # left behind, as by a killed daemon
        async with StatusServer(running.session, stale):
            assert (await query_migrate_over(stale))["status"] == "setup"
        # A live socket is someone else's: not taken over.
        async with StatusServer(running.session, short_dir / "live.sock"):
            with pytest.raises(UsageError, match="another process is listening"):
                await StatusServer(running.session, short_dir / "live.sock").start()
            assert (await query_migrate_over(short_dir / "live.sock"))["status"] == "setup"
        regular = short_dir / "regular"
        regular.write_text("mine")
        with pytest.raises(UsageError, match="cannot listen on --status-socket"):
            await StatusServer(running.session, regular).start()
        assert regular.read_text() == "mine"
    finally:
        running.session.cancel()
        with pytest.raises(Cancelled):
            await running.result()


def test_query_migrate_pins_time(tmp_path: Path) -> None:
    """The snapshot takes ``now``: total time and Mbit/s follow from it, not from a clock."""
    from vfio_multifd import Session, SessionError
    from vfio_multifd.core.wire import ChannelHandshake
    from vfio_multifd.errors import Reason

    core = Session(settings(tmp_path, A, channels=1)).core
    # transferred is what the accepted channels received: one that got 5 MB.
    core.connection_made(0, "source", 100.0)
    core.handshake(0, ChannelHandshake(0), 100.0)
    core.received(0, 5_000_000)
    info = query_migrate(core.snapshot(102.0))
    assert (info["total-time"], info["transferred"], info["mbps"]) == (2000, 5_000_000, 20.0)
    core.fail(SessionError(Reason.INTERNAL, "x"), 101.0)  # finished
    assert query_migrate(core.snapshot(500.0))["total-time"] == 1000


def test_readme_documents_every_query_migrate_field(tmp_path: Path) -> None:
    """address, paused-time, peak-queued-bytes, refused-connections, instance-id... were not."""
    from vfio_multifd import Session, SessionError
    from vfio_multifd.core.wire import ChannelHandshake
    from vfio_multifd.errors import Reason

    core = Session(settings(tmp_path, A, channels=1)).core
    core.connection_made(0, "source", 100.0)
    core.handshake(0, ChannelHandshake(0), 100.0)
    core.reassembly.devices[A].last_idx = 3  # last-idx appears once the config came
    core.fail(SessionError(Reason.INTERNAL, "x"), 100.5)
    info = query_migrate(core.snapshot(101.0))
    fields = set(info) | set(info["devices"][0]) | set(info["channels"][0])
    page = (Path(__file__).parent.parent / "docs" / "operating.md").read_text()
    start = page.index("## Status socket")
    status_section = page[start : page.index("\n## ", start)]
    undocumented = sorted(f for f in fields if f"`{f}`" not in status_section)
    assert not undocumented, undocumented
    assert "`mbps` is **megabits** per second" in status_section
    assert "error-desc" in fields


# -- the CLI: status command and cancel over the socket -----------------------------


def test_cli_status_table_json_and_cancel(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    path = short_dir / "status.sock"
    daemon = Daemon(
        tmp_path,
        "--channels",
        "2",
        "--status-socket",
        str(path),
        "--device",
        f"idstr={IDSTR},data={out / 'a.bin'}",
    )
    daemons.append(daemon)
    assert path.exists(), "the status socket answers once the daemon is ready"
    socks = partial_stream(daemon.address, channels=2, chunks=3, chunk_size=65536)
    try:
        wait_for(
            lambda: query(str(path))["return"]["devices"][0]["next-idx"] == 3,
            what="three chunks written",
        )
        table = run(["status", "--socket", str(path)], timeout=20)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert re.fullmatch(
            r"status: active   total-time: \d+ ms   transferred: \d+ bytes   "
            r"mbps: [\d.]+ \(megabits/s\)",
            lines[0],
        ), lines[0]
        assert re.fullmatch(
            r"queued: \d+ bytes \(peak \d+ bytes\), spilled: 0 bytes, paused: \d+ ms, "
            r"refused connections: 0",
            lines[1],
        ), lines[1]
        device_row = next(line for line in lines if line.startswith(IDSTR))
        assert device_row.split() == [IDSTR, str(3 * 65536), "3", "-", "0", "no"]
        header = next(n for n, line in enumerate(lines) if line.startswith("channel "))
        assert lines[header].split() == ["channel", "state", "bytes", "packets", "peer"]
        assert [line.split()[:2] for line in lines[header + 1 :]] == [
            ["0", "active"],
            ["1", "active"],
        ]
        as_json = run(["status", "--socket", str(path), "--json"], timeout=20)
        info = json.loads(as_json.stdout)
        assert info["status"] == "active" and info["channels"][0]["packets"] == 3

        assert query(str(path), "migrate_cancel") == {"return": {}}
        code, summary, stderr = daemon.finish(timeout=10)
    finally:
        for sock in socks:
            sock.close()
    assert code == 1, stderr
    assert stderr.splitlines()[-1] == "vfio-multifd: cancelled by migrate_cancel"
    assert TRACEBACK not in stderr
    assert summary == ""
    assert os.listdir(out) == []
    assert not path.exists()
    gone = run(["status", "--socket", str(path)], timeout=20)
    assert gone.returncode == 1
    assert gone.stderr.startswith(f"vfio-multifd: error: status socket {path} does not exist")


@pytest.mark.parametrize("case", ["missing", "regular file", "stale socket", "silent listener"])
def test_status_where_nothing_answers_says_which_socket_and_whether_it_exists(
    short_dir: Path, case: str
) -> None:
    """It said only "timed out", after 5 s."""
    path = short_dir / "status.sock"
    expected = {
        "missing": f"status socket {path} does not exist: no daemon listens there (receive "
        "--status-socket creates it, and removes it when the migration ends)",
        "regular file": f"{path} is a regular file, not a socket: give the path of receive "
        "--status-socket (or of QEMU's QMP socket)",
        "stale socket": f"status socket {path} exists, but nothing listens on it: the daemon "
        "that made it is gone (its exit code is the final word)",
        "silent listener": f"status socket {path} accepted the connection but sent no answer "
        "within 0.2 s (--timeout): is a vfio-multifd daemon or QEMU's QMP monitor behind it?",
    }[case]
    with contextlib.ExitStack() as stack:
        if case == "regular file":
            path.write_text("")
        elif case != "missing":
            server = stack.enter_context(socket.socket(socket.AF_UNIX))
            server.bind(str(path))
            if case == "silent listener":
                server.listen()  # never accepts, never greets
            else:
                server.close()  # the path stays, nobody listens
        result = run(["status", "--socket", str(path), "--timeout", "0.2"], timeout=20)
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    assert result.stderr == f"vfio-multifd: error: {expected}\n"


def test_status_socket_that_cannot_be_made_is_a_usage_error(tmp_path: Path, cli_loop: str) -> None:
    last_line = receive_usage_error(
        tmp_path,
        "--listen",
        "tcp:127.0.0.1:0",
        "--status-socket",
        str(tmp_path / "no" / "such" / "dir" / "s.sock"),
    )
    assert last_line.startswith("vfio-multifd: error: cannot listen on --status-socket")
    assert os.listdir(tmp_path) == []


# -- readiness -----------------------------------------------------------------------


def test_ready_fd_gets_one_newline_then_eof_and_the_port_accepts(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    read_end, write_end = os.pipe()
    stderr = open(tmp_path / "stderr", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            *TOOL,
            *with_event_loop(
                [
                    "receive",
                    "--listen",
                    "tcp:127.0.0.1:0",
                    "--device",
                    f"idstr=a,data={tmp_path / 'a.bin'}",
                    "--ready-fd",
                    str(write_end),
                    "--log-format",
                    "json",
                ]
            ),
        ],
        stderr=stderr,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        pass_fds=(write_end,),
    )
    os.close(write_end)
    try:
        readable, _, _ = select.select([read_end], [], [], 20)
        assert readable, "no readiness byte within 20 s"
        assert os.read(read_end, 16) == b"\n"
        readable, _, _ = select.select([read_end], [], [], 5)
        assert readable and os.read(read_end, 16) == b"", "the ready fd stays open"
        listening = [
            json.loads(line)
            for line in (tmp_path / "stderr").read_text().splitlines()
            if '"listening"' in line
        ]
        host, _, port = str(listening[0]["address"]).removeprefix("tcp:").rpartition(":")
        socket.create_connection((host, int(port)), timeout=5).close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 143
    finally:
        os.close(read_end)
        stderr.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_sd_notify_path_and_abstract_sockets(short_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(short_dir / "notify"))
        listener.settimeout(5)
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": str(short_dir / "notify")})
        assert listener.recv(4096) == b"READY=1"
    name = f"vfio-multifd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert listener.recv(4096) == b"READY=1"
    assert not sd_notify("READY=1", {})
    assert not sd_notify("READY=1", {"NOTIFY_SOCKET": str(short_dir / "nobody-listens")})


def test_daemon_notifies_systemd_when_ready(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon]
) -> None:
    name = f"vfio-multifd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(20)
        daemon = Daemon(
            tmp_path,
            "--device",
            f"idstr=a,data={tmp_path / 'a.bin'}",
            env={**os.environ, "NOTIFY_SOCKET": "@" + name},
        )
        daemons.append(daemon)
        message = listener.recv(4096).decode()
    fields = dict(line.split("=", 1) for line in message.splitlines())
    assert fields["READY"] == "1"
    assert daemon.address in fields["STATUS"]


def test_a_notify_socket_that_never_reads_does_not_stall_the_daemon(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon]
) -> None:
    """sd_notify never blocks: a full datagram queue loses STATUS= lines, not the loop."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as deaf:
        deaf.bind(str(short_dir / "notify"))  # bound, never read: its queue fills
        daemon = Daemon(
            tmp_path,
            "--progress-interval",
            "0.01",
            "--device",
            f"idstr={IDSTR},data={tmp_path / 'a.bin'}",
            env={**os.environ, "NOTIFY_SOCKET": str(short_dir / "notify")},
        )
        daemons.append(daemon)
        socks = partial_stream(daemon.address, channels=2, chunks=1, chunk_size=4096)
        try:
            # Far more progress lines than the queue holds (net.unix.max_dgram_qlen, 10+).
            wait_for(
                lambda: sum(e["event"] == "migration_progress" for e in daemon.events()) >= 50,
                what="progress lines to keep coming",
            )
            daemon.proc.send_signal(signal.SIGTERM)
            code, _, _ = daemon.finish(timeout=5)
        finally:
            for sock in socks:
                sock.close()
    assert code == 143


# -- logs ------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("requested", "terminal", "chosen"),
    [
        ("auto", False, "json"),
        ("auto", True, "console"),
        ("json", True, "json"),
        ("console", False, "console"),
    ],
)
def test_log_format_selection(
    restore_logging: None, requested: str, terminal: bool, chosen: str
) -> None:
    stream = _Terminal() if terminal else io.StringIO()
    assert logconfig.configure(log_format=requested, stream=stream) == chosen
    structlog.get_logger("test").bind(channel=1).info("channel_accepted", device="d")
    line = stream.getvalue().strip()
    if chosen == "json":
        event = json.loads(line)
        assert (event["event"], event["channel"], event["device"]) == ("channel_accepted", 1, "d")
        assert event["level"] == "info" and event["timestamp"].endswith("Z")
    else:
        with pytest.raises(ValueError):
            json.loads(line)
        assert "channel_accepted" in line and "channel" in line


def test_log_level_filters(restore_logging: None) -> None:
    stream = io.StringIO()
    logconfig.configure(log_format="json", level="warning", stream=stream)
    log = structlog.get_logger("test")
    log.info("quiet")
    log.warning("loud")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["loud"]


def test_cli_log_formats(tmp_path: Path) -> None:
    """Not a terminal: JSON by default; ``--log-format console`` overrides it. (In this
    process, whose stderr is then not a terminal either; the loop plays no part.)"""
    base = ["receive", "--listen", "tcp:127.0.0.1:0", "--device", f"idstr=a,data={tmp_path / 'a'}"]
    for extra, is_json in (([], True), (["--log-format", "console"], False)):
        # --accept-timeout ends the run quickly with a log line or two.
        result = run_in_process([*base, *extra, "--accept-timeout", "0.3"])
        assert result.returncode == 1
        logs = result.stderr.splitlines()[:-1]
        assert logs
        parsed = []
        for line in logs:
            try:
                parsed.append(json.loads(line))
            except ValueError:
                parsed.append(None)
        if is_json:
            assert all(parsed) and parsed[0]["event"] == "listening"
        else:
            assert not any(parsed) and "listening" in logs[0]


def test_progress_lines_and_trace_events(tmp_path: Path, daemons: list[Daemon]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    daemon = Daemon(
        tmp_path,
        "--channels",
        "2",
        "--log-level",
        "debug",
        "--progress-interval",
        "0.1",
        "--device",
        f"idstr={IDSTR},data={out / 'a.bin'}",
    )
    daemons.append(daemon)
    socks = partial_stream(daemon.address, channels=2, chunks=2, chunk_size=4096)
    received = 2 * 64 + 2 * (276 + 12 + 4096)  # two handshakes, two packets

    def progress_seen() -> bool:
        return any(
            e["event"] == "migration_progress"
            and e["bytes"] == received
            and e["next_idx"] == {IDSTR: 2}
            for e in daemon.events()
        )

    try:
        wait_for(progress_seen, what="a progress line with both chunks")
        daemon.proc.send_signal(signal.SIGTERM)
        code, _, _ = daemon.finish(timeout=10)
    finally:
        for sock in socks:
            sock.close()
    assert code == 143
    events = daemon.events()
    progress = [e for e in events if e["event"] == "migration_progress"]
    assert all({"bytes", "bytes_written", "bytes_per_s", "next_idx"} <= set(e) for e in progress)
    incoming = [e for e in events if e["event"] == "buffer_incoming"]
    assert [(e["channel"], e["device"], e["idx"]) for e in incoming] == [
        (0, IDSTR, 0),
        (0, IDSTR, 1),
    ]
    levels = {e["event"]: e["level"] for e in events}
    assert levels["buffer_incoming"] == levels["load_starved"] == "debug"
    assert levels["load_start"] == levels["load_end"] == "debug"
    for name in ("listening", "channel_accepted", "load_thread_start", "state_change"):
        assert levels[name] == "info", name
    accepted = [e for e in events if e["event"] == "channel_accepted"]
    assert sorted(e["channel"] for e in accepted) == [0, 1]
    assert part_files(out) == []
