"""``receive --result`` and ``send --result``: one JSON document at exit, for a
completed, a failed and a cancelled run, each field documented and each
documented field written. Real processes on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    TOOL,
    Daemon,
    partial_stream,
    receiver,
    run_in_process,
    send_to,
    wait_for,
)
from helpers import IDSTR, random_bytes

from vfio_multifd.ops.status_client import query

ROOT = Path(__file__).parent.parent


def documented_fields(page: str) -> set[str]:
    """The field names in the table of the page's ``--result`` section."""
    text = (ROOT / "docs" / page).read_text()
    section = text.split("## The result: `--result PATH`", 1)[1].split("\n## ", 1)[0]
    fields: set[str] = set()
    for row in re.findall(r"^\| (`[^|]*`) \|", section, re.M):
        fields.update(re.findall(r"`([^`]+)`", row))
    return fields


def written_fields(document: dict[str, Any], prefix: str = "") -> set[str]:
    """Every key, ``list[].key`` for the objects of a list; a dict's own keys are
    values, not fields, below the top (``refused``: reason -> count)."""
    fields: set[str] = set()
    for key, value in document.items():
        name = prefix + key
        fields.add(name)
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    fields |= written_fields(item, f"{name}[].")
    return fields


def check_documented(document: dict[str, Any], page: str) -> None:
    written = written_fields(document)
    documented = documented_fields(page)
    assert written - documented == set(), "written, not documented"
    # An empty list (no channel connected) writes none of its items' fields.
    empty = {f"{key}[]." for key, value in document.items() if value == []}
    missing = {f for f in documented - written if not any(f.startswith(e) for e in empty)}
    assert missing == set(), "documented, not written"


def load(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    assert isinstance(document, dict)
    leftovers = [name for name in os.listdir(path.parent) if name.endswith(".tmp")]
    assert leftovers == []
    return document


def test_a_completed_migration_is_described_by_both_ends(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    data = random_bytes(3 * 65536 + 5, 3)
    source = tmp_path / "nic.state"
    source.write_bytes(data)
    # A link at PATH is replaced, never written through.
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    received_at = tmp_path / "received.json"
    received_at.symlink_to(victim)
    daemon, out = receiver(tmp_path, daemons, "--channels", "3", "--result", str(received_at))
    sent_at = tmp_path / "sent.json"
    sent = send_to(
        daemon.address, 3, f"idstr={IDSTR},source={source}",
        "--chunk-size", "64K", "--uuid", "12345678-1234-5678-1234-567812345678",
        "--result", str(sent_at),
    )  # fmt: skip
    assert sent.returncode == 1, sent.stderr  # the uuids differ: every channel refused
    sent_doc = load(sent_at)
    assert (sent_doc["outcome"], sent_doc["exit_code"], sent_doc["reason"]) == (
        "failed", 1, "channel-reset",
    )  # fmt: skip
    sent = send_to(daemon.address, 3, f"idstr={IDSTR},source={source}", "--chunk-size", "64K",
                   "--result", str(sent_at))  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    code, summary, stderr = daemon.finish()
    assert code == 0, stderr
    assert (out / "a.bin").read_bytes() == data
    assert victim.read_bytes() == b"keep" and not received_at.is_symlink()

    received = load(received_at)
    check_documented(received, "receiving.md")
    assert {k: received[k] for k in ("command", "outcome", "exit_code", "reason", "message")} == {
        "command": "receive", "outcome": "completed", "exit_code": 0, "reason": None,
        "message": None,
    }  # fmt: skip
    assert received["uuid"] == "00000000-0000-0000-0000-000000000000"
    (device,) = received["devices"]
    digest = re.search(r"xxh3-128:[0-9a-f]{32}", summary)
    assert digest is not None
    assert device == {
        "idstr": IDSTR, "instance": 0, "data_path": str(out / "a.bin"),
        "config_path": str(out / "a.bin.config"), "bytes": len(data), "chunks": 4,
        "config_bytes": (out / "a.bin.config").stat().st_size, "digest": digest.group(),
    }  # fmt: skip
    assert received["refused"] == {"handshake-uuid": 3}
    assert received["spilled_bytes"] == 0 and received["peak_queued_bytes"] > 0
    assert 0 < received["duration_s"] < 60

    sent_doc = load(sent_at)
    check_documented(sent_doc, "sending.md")
    assert (sent_doc["outcome"], sent_doc["exit_code"], sent_doc["reason"]) == (
        "completed", 0, None,
    )  # fmt: skip
    assert sent_doc["devices"] == [
        {"idstr": IDSTR, "instance": 0, "source": str(source), "bytes": len(data),
         "chunks": 4, "digest": digest.group()},
    ]  # fmt: skip
    assert sent_doc["address"] == daemon.address
    # What the daemon received on each channel is what the sender sent on it.
    by_id = {c["id"]: c["bytes"] for c in received["channels"]}
    assert by_id == {c["id"]: c["bytes"] for c in sent_doc["channels"]}
    assert sum(by_id.values()) > len(data)


def test_a_failed_migration_says_why_and_puts_no_path(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    result = tmp_path / "result.json"
    daemon, out = receiver(tmp_path, daemons, "--channels", "2", "--result", str(result))
    sent_at = tmp_path / "sent.json"
    sent = send_to(daemon.address, 2, f"idstr={IDSTR},size=256K", "--chunk-size", "64K",
                   "--inject", "missing", "--result", str(sent_at))  # fmt: skip
    assert sent.returncode == 1
    code, _, stderr = daemon.finish()
    assert code == 1
    document = load(result)
    check_documented(document, "receiving.md")
    last = stderr.splitlines()[-1]
    assert document["outcome"] == "failed" and document["exit_code"] == 1
    assert document["reason"] == "incomplete"
    assert f"vfio-multifd: error: {document['message']}" == last
    (device,) = document["devices"]
    assert (device["data_path"], device["config_path"], device["digest"]) == (None, None, None)
    assert device["bytes"] == 0  # chunk 0 never came: nothing could be written
    assert os.listdir(out) == []
    sent_doc = load(sent_at)
    check_documented(sent_doc, "sending.md")
    assert (sent_doc["outcome"], sent_doc["reason"]) == ("failed", "channel-reset")
    assert sent.stderr.splitlines()[-1] == f"vfio-multifd: error: {sent_doc['message']}"


def test_a_cancelled_daemon_says_what_it_had_received(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    result = tmp_path / "result.json"
    status = tmp_path / "status.sock"
    daemon, out = receiver(tmp_path, daemons, "--channels", "2", "--result", str(result),
                           "--status-socket", str(status))  # fmt: skip
    socks = partial_stream(daemon.address, channels=2, chunks=3, chunk_size=65536)
    try:
        expected = {0: 64 + 3 * (276 + 12 + 65536), 1: 64}

        def received() -> dict[int, int]:
            channels = query(str(status), timeout=5)["return"]["channels"]
            return {c["id"]: c["bytes"] for c in channels}

        wait_for(lambda: received() == expected, what="every byte sent to be received")
        daemon.proc.send_signal(signal.SIGTERM)
        code, _, stderr = daemon.finish()
    finally:
        for sock in socks:
            sock.close()
    assert code == 143, stderr
    document = load(result)
    check_documented(document, "receiving.md")
    assert (document["outcome"], document["exit_code"], document["reason"]) == (
        "cancelled", 143, "cancelled",
    )  # fmt: skip
    assert document["message"] == "cancelled by SIGTERM"
    assert {c["id"]: c["bytes"] for c in document["channels"]} == expected
    assert document["devices"][0]["data_path"] is None
    assert os.listdir(out) == []


def test_a_sender_stopped_by_sigterm_says_what_it_sent(tmp_path: Path) -> None:
    """The 'daemon' here takes the connections and never answers: the sender waits for a
    verdict until SIGTERM."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    result = tmp_path / "sent.json"
    stderr_path = tmp_path / "send.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [*TOOL, "send", "--connect", f"tcp:127.0.0.1:{port}", "--channels", "2",
             "--device", f"idstr={IDSTR},size=128K", "--chunk-size", "64K",
             "--log-format", "json", "--result", str(result)],
            stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    conns: list[socket.socket] = []
    try:
        received: dict[int, int] = {}
        for _ in range(2):
            conn, _ = listener.accept()
            conns.append(conn)
            conn.settimeout(10)
            data = b""
            while chunk := conn.recv(1 << 20):  # the sender ends its stream, then waits
                data += chunk
            received[data[24]] = len(data)  # the handshake's channel id
        wait_for(lambda: "waiting_for_daemon" in stderr_path.read_text(), what="the verdict wait")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for conn in conns:
            conn.close()
        listener.close()
    document = load(result)
    check_documented(document, "sending.md")
    assert (document["outcome"], document["exit_code"], document["reason"]) == (
        "cancelled", 143, "cancelled",
    )  # fmt: skip
    assert {c["id"]: c["bytes"] for c in document["channels"]} == received
    assert stderr_path.read_text().splitlines()[-1] == f"vfio-multifd: {document['message']}"


@pytest.mark.parametrize("command", ["receive", "send"])
def test_an_unusable_result_path_is_a_usage_error_before_anything_starts(
    tmp_path: Path, command: str
) -> None:
    args = (
        ["receive", "--listen", "tcp:127.0.0.1:0", "--device", f"idstr=a,data={tmp_path}/a"]
        if command == "receive"
        else ["send", "--connect", "tcp:127.0.0.1:9", "--device", "idstr=a,size=1"]
    )
    missing = tmp_path / "no" / "r.json"
    for path, message in [
        (missing, f"--result {missing}: its directory cannot be opened: No such file or "
                  "directory (ENOENT, errno 2)"),
        (tmp_path, f"--result {tmp_path} is a directory; give the path of a file"),
    ]:  # fmt: skip
        done = run_in_process([*args, "--result", str(path), "--log-format", "json"])
        assert done.returncode == 2
        assert done.stderr.splitlines() == [f"vfio-multifd: error: {message}"]
    assert os.listdir(tmp_path) == []


def test_a_usage_error_found_after_the_options_is_described_too(tmp_path: Path) -> None:
    result = tmp_path / "r.json"
    data = tmp_path / "a.bin"
    started = time.monotonic()
    done = run_in_process(["receive", "--device", f"idstr=a,data={data}", "--device",
                           f"idstr=b,data={data}", "--result", str(result)])  # fmt: skip
    assert done.returncode == 2 and time.monotonic() - started < 20
    document = load(result)
    check_documented(document, "receiving.md")
    assert (document["outcome"], document["exit_code"], document["reason"]) == (
        "failed", 2, "usage",
    )  # fmt: skip
    assert done.stderr.splitlines()[-1] == f"vfio-multifd: error: {document['message']}"
