"""The status socket with ``qemu.qmp`` (the QEMU project's asyncio QMP library) as the
client, and ``vfio-multifd status --watch`` built on it. Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import TOOL, Daemon, receiver, run, send_to, wait_for
from helpers import IDSTR, json_stream, send_json, settings, start
from qemu.qmp import EventListener, ExecuteError, QMPClient

from vfio_multifd import Cancelled, DeviceKey
from vfio_multifd.ops.status_server import StatusServer

A = DeviceKey(IDSTR, 0)


async def test_qemu_qmp_negotiates_queries_cancels_and_gets_qemus_error_class(
    tmp_path: Path, short_dir: Path
) -> None:
    running = await start(settings(tmp_path, A, channels=1))
    path = short_dir / "status.sock"
    async with StatusServer(running.session, path):
        qmp = QMPClient("test")
        await asyncio.wait_for(qmp.connect(str(path)), 5)  # greeting + qmp_capabilities
        try:
            assert qmp.greeting is not None
            assert qmp.greeting.QMP.capabilities == []
            assert "vfio-multifd" in qmp.greeting.QMP.version["package"]
            info = await asyncio.wait_for(qmp.execute("query-migrate"), 5)
            assert isinstance(info, dict) and info["status"] == "setup"
            with pytest.raises(ExecuteError) as raised:
                await asyncio.wait_for(qmp.execute("no-such-command"), 5)
            assert raised.value.error_class == "CommandNotFound"  # as QEMU answers
            assert str(raised.value) == "The command no-such-command has not been found"
            events = EventListener(("MIGRATION",))
            with qmp.listen(events):
                assert await asyncio.wait_for(qmp.execute("migrate_cancel"), 5) == {}
                with pytest.raises(Cancelled, match="cancelled by migrate_cancel"):
                    await running.result()
                seen = [await asyncio.wait_for(events.get(), 5) for _ in range(2)]
            assert [e["data"]["status"] for e in seen] == ["cancelling", "cancelled"]
            info = await asyncio.wait_for(qmp.execute("query-migrate"), 5)
            assert isinstance(info, dict) and info["status"] == "cancelled"
        finally:
            await asyncio.wait_for(qmp.disconnect(), 5)


def _watch(path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*TOOL, "status", "--socket", str(path), "--watch", "0.2", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


@dataclass
class Watched:
    """A migration watched to its end by ``status --watch 0.2 --json``."""

    sent: subprocess.CompletedProcess[str]
    code: int  # the watcher's exit code
    answers: list[dict[str, Any]]  # one per line it printed
    stderr: str  # the watcher's
    daemon: tuple[int, str, str]  # the daemon's exit code, stdout and stderr


def watch_a_migration(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon], device: str, *send_options: str
) -> Watched:
    """A daemon with a status socket, a watcher started before ``send`` of ``device``."""
    path = short_dir / "status.sock"
    daemon, _ = receiver(tmp_path, daemons, "--channels", "2", "--status-socket", str(path))
    watcher = _watch(path, "--json")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(watcher.stdout or []), daemon=True)
    reader.start()
    try:
        wait_for(lambda: lines, what="the watcher's first answer")  # then send
        sent = send_to(daemon.address, 2, device, *send_options)
        code = watcher.wait(30)
        reader.join(5)
        stderr = watcher.stderr.read() if watcher.stderr else ""
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(5)
    answers = [json.loads(line) for line in lines]
    return Watched(sent, code, answers, stderr, daemon.finish())


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_watch_until_the_end_then_exit_by_outcome(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon], outcome: str
) -> None:
    extra = ["--inject", "duplicate"] if outcome == "failed" else []
    watched = watch_a_migration(
        tmp_path, short_dir, daemons, f"idstr={IDSTR},size=400000,seed=5", *extra
    )
    answers, stderr = watched.answers, watched.stderr
    assert answers and answers[0]["status"] in ("setup", "active", outcome), (answers, stderr)
    assert answers[-1]["status"] == outcome, (answers, stderr)
    assert watched.code == (0 if outcome == "completed" else 1), stderr


def test_watch_where_nothing_answers_says_why(short_dir: Path) -> None:
    path = short_dir / "status.sock"
    result = run(["status", "--socket", str(path), "--watch", "0.2"])
    assert result.returncode == 1
    assert result.stderr.startswith(f"vfio-multifd: error: status socket {path} does not exist")


def test_watch_ends_with_the_figures_the_daemon_reported_at_the_end(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon]
) -> None:
    """Issue 20 item 3: the daemon exits (and takes its socket with it) right after the
    migration completes, too soon for one more query-migrate. The final answer must
    still be the daemon's final figures, not the last poll with its status replaced
    (which showed a 64 MiB migration completed with 0 bytes written)."""
    size = 64 << 20
    watched = watch_a_migration(tmp_path, short_dir, daemons, f"idstr={IDSTR},size={size},seed=5")
    assert watched.sent.returncode == 0, watched.sent.stderr
    daemon_code, summary, _ = watched.daemon
    assert daemon_code == 0
    assert summary.startswith(f"device {IDSTR}: {size} bytes in 64 chunks"), summary
    assert watched.code == 0, watched.stderr
    final = watched.answers[-1]
    assert final["status"] == "completed", final
    [device] = final["devices"]
    assert (device["bytes-written"], device["complete"]) == (size, True), final
    assert device["next-idx"] == device["last-idx"] + 1 == 65, final  # 64 chunks, config
    # everything the channels received, headers included: what the daemon counted
    assert final["transferred"] == sum(c["bytes"] for c in final["channels"]) > size
    assert [c["state"] for c in final["channels"]] == ["closed", "closed"], final


def test_watch_says_plainly_when_the_final_figures_are_the_last_seen(short_dir: Path) -> None:
    """Against a QMP server whose final MIGRATION event has no figures (QEMU's own) and
    that hangs up before the next query: the final answer is the last one seen with the
    event's status, and it says so (it used to pass them off as the final figures)."""
    path = short_dir / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(20)
    active = {"status": "active", "total-time": 10, "transferred": 5000, "mbps": 4.0}

    def qemu() -> None:
        connection, _ = listener.accept()
        connection.settimeout(20)
        with connection:
            send_json(connection, {"QMP": {"version": {"qemu": {"major": 10, "minor": 1,
                      "micro": 0}, "package": ""}, "capabilities": []}})  # fmt: skip
            for queries, request in enumerate(json_stream(connection)):
                if request["execute"] == "query-migrate" and queries == 2:
                    return  # the daemon is gone: no answer
                reply = {"return": active if request["execute"] == "query-migrate" else {}}
                if "id" in request:
                    reply["id"] = request["id"]
                send_json(connection, reply)
                if queries == 1:
                    send_json(connection, {"event": "MIGRATION", "data": {"status": "completed"},
                              "timestamp": {"seconds": 0, "microseconds": 0}})  # fmt: skip

    server = threading.Thread(target=qemu, daemon=True)
    server.start()
    try:
        watcher = _watch(path, "--json")
        out, err = watcher.communicate(timeout=30)
    finally:
        server.join(20)
        listener.close()
    assert watcher.returncode == 0, err
    answers = [json.loads(line) for line in out.splitlines()]
    assert answers[0] == active
    assert answers[-1] == {
        **active,
        "status": "completed",
        "note": "the migration ended completed; the other figures are the last seen before "
        "that: the status socket closed before it could be asked again",
    }
