"""The status socket with ``qemu.qmp`` (the QEMU project's asyncio QMP library) as the
client, and ``vfio-multifd status --watch`` built on it. Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from pathlib import Path

import pytest
from cli_helpers import TOOL, Daemon, send_to, wait_for
from helpers import IDSTR, settings, start
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


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_watch_until_the_end_then_exit_by_outcome(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon], outcome: str
) -> None:
    path = short_dir / "status.sock"
    out = tmp_path / "out"
    out.mkdir()
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
    watcher = _watch(path, "--json")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(watcher.stdout or []), daemon=True)
    reader.start()
    try:
        wait_for(lambda: lines, what="the watcher's first answer")  # then send
        extra = ["--inject", "duplicate"] if outcome == "failed" else []
        send_to(daemon.address, 2, f"idstr={IDSTR},size=400000,seed=5", *extra)
        code = watcher.wait(30)
        reader.join(5)
        stderr = watcher.stderr.read() if watcher.stderr else ""
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(5)
    daemon.finish()
    answers = [json.loads(line) for line in lines]
    assert answers and answers[0]["status"] in ("setup", "active", outcome), (answers, stderr)
    assert answers[-1]["status"] == outcome, (answers, stderr)
    assert code == (0 if outcome == "completed" else 1), stderr


def test_watch_where_nothing_answers_says_why(short_dir: Path) -> None:
    path = short_dir / "status.sock"
    result = _watch(path)
    _, stderr = result.communicate(timeout=30)
    assert result.returncode == 1
    assert stderr.startswith(f"vfio-multifd: error: status socket {path} does not exist")
