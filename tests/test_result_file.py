"""``receive --result``, ``send --result`` and ``replay --result``: one JSON document
at exit, for a completed, a failed and a cancelled run (and a replay without a
verdict), each field documented and each documented field written. Real
processes on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qemu_source as qs
from cli_helpers import (
    TOOL,
    TRACEBACK,
    Daemon,
    partial_stream,
    receiver,
    run_in_process,
    send_to,
    wait_for,
)
from helpers import IDSTR, closed_address, random_bytes
from test_record import (
    OTHER_UUID,
    Peer,
    colliding_recording,
    edit_manifest,
    fake_recording,
    replay_cli,
    write_recording,
    xxh3,
)

from vfio_multifd.ops.manifest import ChannelEnd, channel_file
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


@contextlib.contextmanager
def running(argv: list[str], stderr_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``vfio-multifd ARGV`` in a subprocess, its stderr in ``stderr_path``; killed on the
    way out if it is still running."""
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [*TOOL, *argv], stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


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
    conns: list[socket.socket] = []
    try:
        with running(
            ["send", "--connect", f"tcp:127.0.0.1:{port}", "--channels", "2",
             "--device", f"idstr={IDSTR},size=128K", "--chunk-size", "64K",
             "--log-format", "json", "--result", str(result)],
            stderr_path,
        ) as proc:  # fmt: skip
            received: dict[int, int] = {}
            for _ in range(2):
                conn, _ = listener.accept()
                conns.append(conn)
                conn.settimeout(10)
                data = b""
                while chunk := conn.recv(1 << 20):  # the sender ends its stream, then waits
                    data += chunk
                received[data[24]] = len(data)  # the handshake's channel id
            wait_for(
                lambda: "waiting_for_daemon" in stderr_path.read_text(), what="the verdict wait"
            )
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 143
    finally:
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


@pytest.mark.parametrize("command", ["receive", "send", "replay"])
def test_an_unusable_result_path_is_a_usage_error_before_anything_starts(
    tmp_path: Path, command: str
) -> None:
    args = {
        "receive": ["receive", "--listen", "tcp:127.0.0.1:0", "--device",
                    f"idstr=a,data={tmp_path}/a"],
        "send": ["send", "--connect", "tcp:127.0.0.1:9", "--device", "idstr=a,size=1"],
        # No such recording either: the path is checked first.
        "replay": ["replay", str(tmp_path / "rec"), "--connect", "tcp:127.0.0.1:9"],
    }[command]  # fmt: skip
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


@pytest.mark.parametrize("command", ["send", "replay"])
def test_an_existing_result_is_replaced_by_a_late_usage_error_and_kept_on_a_bad_option(
    tmp_path: Path, command: str
) -> None:
    """replay follows send's rule: a usage error found once the options were read (send
    without a device; replay of what is not a recording) is an end like any other, said
    at PATH; an option argparse refuses is found before PATH is even looked at."""
    result = tmp_path / "r.json"
    result.write_text("the previous run's\n")
    args = {
        "send": ["send", "--connect", closed_address()],
        "replay": ["replay", str(tmp_path / "empty"), "--connect", closed_address()],
    }[command]
    (tmp_path / "empty").mkdir()
    refused, why = {
        "send": (["--channels", "0"], "--channels must be 1..256 (a one-byte id), not 0"),
        "replay": (["--verdict-timeout", "0"], "argument --verdict-timeout: must be a finite "
                   "number of seconds above 0, not '0'"),
    }[command]  # fmt: skip
    done = run_in_process([*args, *refused, "--result", str(result)])
    assert (done.returncode, done.stderr) == (2, f"vfio-multifd: error: {why}\n")
    assert result.read_text() == "the previous run's\n"
    done = run_in_process([*args, "--log-format", "json", "--result", str(result)])
    assert done.returncode == 2, done.stderr
    document = load(result)
    assert (document["command"], document["outcome"], document["exit_code"]) == (
        command, "failed", 2,
    )  # fmt: skip
    assert document["reason"] == "usage"
    assert done.stderr.splitlines()[-1] == f"vfio-multifd: error: {document['message']}"


# -- replay --result ------------------------------------------------------------------------


def replay_ended(path: Path, outcome: str, exit_code: int, reason: str | None) -> dict[str, Any]:
    """``replay --result``'s document at ``path``, every field documented, which says
    how the replay ended."""
    document = load(path)
    check_documented(document, "record-replay.md")
    assert (document["outcome"], document["exit_code"], document["reason"]) == (
        outcome, exit_code, reason,
    )  # fmt: skip
    return document


def sent_per_channel(stdout: str) -> dict[int, tuple[int, int]]:
    """What replay printed: channel id -> (bytes sent, bytes recorded)."""
    return {
        int(n): (int(sent), int(total))
        for n, sent, total in re.findall(r"^channel (\d+): sent (\d+) of (\d+) bytes", stdout, re.M)
    }


def test_a_replay_the_daemon_completes_says_so_with_each_channels_bytes(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    data = random_bytes(4 * 65536 + 11, 21)
    streams = qs.build_streams(
        [(IDSTR, 0, data, b"config")], channels=3, order="random", seed=2, chunk_size=65536,
        uuid=bytes.fromhex(OTHER_UUID.replace("-", "")),
    )  # fmt: skip
    record = tmp_path / "rec"
    write_recording(record, streams, [(0.0, 0.0)] * 3, ChannelEnd.EOF)
    edit_manifest(record, lambda raw: raw.update(uuid=OTHER_UUID))  # as the handshakes say
    received_at = tmp_path / "received.json"
    daemon, out = receiver(tmp_path, daemons, "--channels", "3", "--uuid", OTHER_UUID,
                           "--result", str(received_at))  # fmt: skip
    result = tmp_path / "replayed.json"
    replayed = replay_cli(record, daemon.address, "--result", str(result))
    assert replayed.returncode == 0, replayed.stderr
    code, _, stderr = daemon.finish()
    assert code == 0, stderr
    assert (out / "a.bin").read_bytes() == data

    document = replay_ended(result, "completed", 0, None)
    assert {k: v for k, v in document.items() if k not in ("duration_s", "channels")} == {
        "command": "replay", "outcome": "completed", "exit_code": 0, "reason": None,
        "message": None, "uuid": OTHER_UUID, "address": daemon.address,
        "directory": str(record),
    }  # fmt: skip
    assert 0 < document["duration_s"] < 60
    # Every channel, in the order it connected, sent all its file holds...
    order = [int(n) for n in re.findall(r"channel ids (.*)", replayed.stdout)[0].split(", ")]
    assert document["channels"] == [
        {"id": n, "peer": daemon.address, "bytes": len(streams[n]),
         "recorded_bytes": len(streams[n])}
        for n in order
    ]  # fmt: skip
    # ... and the daemon received exactly that on each.
    by_id = {c["id"]: c["bytes"] for c in load(received_at)["channels"]}
    assert by_id == {c["id"]: c["bytes"] for c in document["channels"]}


def test_a_replayed_failure_says_the_daemon_reset_it(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    streams = colliding_recording(tmp_path / "rec")
    daemon, out = receiver(tmp_path, daemons, "--channels", "2")
    result = tmp_path / "replayed.json"
    replayed = replay_cli(tmp_path / "rec", daemon.address, "--result", str(result))
    assert replayed.returncode == 1, replayed.stderr
    assert TRACEBACK not in replayed.stderr
    code, _, stderr = daemon.finish()
    assert (code, stderr.splitlines()[-1]) == (
        1, f"vfio-multifd: error: channel 1: device {IDSTR}: state buffer 0 already filled",
    )  # fmt: skip
    assert os.listdir(out) == []

    document = replay_ended(result, "failed", 1, "channel-reset")
    last = replayed.stderr.splitlines()[-1]
    assert last == f"vfio-multifd: error: {document['message']}"
    assert "the daemon reset the connection" in document["message"]
    assert document["uuid"] == "00000000-0000-0000-0000-000000000000"
    assert (document["address"], document["directory"]) == (daemon.address, str(tmp_path / "rec"))
    # Channel 1 connected first (its first byte was recorded first); what each sent is
    # what replay printed, of what its file holds.
    assert [c["id"] for c in document["channels"]] == [1, 0]
    printed = sent_per_channel(replayed.stdout)
    assert {c["id"]: (c["bytes"], c["recorded_bytes"]) for c in document["channels"]} == printed
    assert {n: total for n, (_, total) in printed.items()} == dict(enumerate(map(len, streams)))
    assert printed[0][0] == len(streams[0])  # idx 0 was all sent before the collision


def test_a_replay_without_a_verdict_says_so_with_exit_3(tmp_path: Path) -> None:
    streams = colliding_recording(tmp_path / "rec")
    peer = Peer(2, sum(map(len, streams)), answer=False)  # reads all, answers nothing
    result = tmp_path / "replayed.json"
    try:
        replayed = replay_cli(
            tmp_path / "rec", peer.address, "--verdict-timeout", "0.3", "--result", str(result)
        )
    finally:
        peer.close()
    assert replayed.returncode == 3, replayed.stderr
    document = replay_ended(result, "failed", 3, "no-verdict")
    assert document["message"] == (
        f"{peer.address}: the daemon gave no verdict within 0.3 s (--verdict-timeout) after "
        "the last byte was sent: the replay reset its channels (the daemon's log says what "
        "it was waiting for)"
    )
    assert replayed.stderr.splitlines()[-1] == f"vfio-multifd: error: {document['message']}"
    assert 0.3 <= document["duration_s"] < 10
    assert document["channels"] == [
        {"id": n, "peer": peer.address, "bytes": len(streams[n]),
         "recorded_bytes": len(streams[n])}
        for n in (1, 0)
    ]  # fmt: skip
    assert sorted(bytes(data) for data in peer.received) == sorted(streams)


def test_a_replay_that_could_not_connect_says_it_sent_nothing_of_each_channel(
    tmp_path: Path,
) -> None:
    streams = colliding_recording(tmp_path / "rec")
    address = closed_address()
    result = tmp_path / "replayed.json"
    replayed = replay_cli(
        tmp_path / "rec", address, "--connect-timeout", "0.1", "--result", str(result)
    )
    assert replayed.returncode == 1, replayed.stderr
    document = replay_ended(result, "failed", 1, "connect-failed")
    assert replayed.stderr.splitlines()[-1] == f"vfio-multifd: error: {document['message']}"
    assert document["channels"] == [
        {"id": n, "peer": address, "bytes": 0, "recorded_bytes": len(streams[n])} for n in (1, 0)
    ]


def test_a_replay_stopped_by_sigterm_says_what_it_sent(tmp_path: Path) -> None:
    streams = colliding_recording(tmp_path / "rec")
    total = sum(map(len, streams))
    peer = Peer(2, total, answer=False)
    result = tmp_path / "replayed.json"
    stderr_path = tmp_path / "replay.stderr"
    try:
        with running(
            ["replay", str(tmp_path / "rec"), "--connect", peer.address,
             "--verdict-timeout", "60", "--log-format", "json", "--result", str(result)],
            stderr_path,
        ) as proc:  # fmt: skip
            # Every byte received: the replay waits for the verdict, in its SIGTERM handler.
            wait_for(lambda: sum(map(len, peer.received)) == total, what="every byte")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 143
    finally:
        peer.close()
    document = replay_ended(result, "cancelled", 143, "cancelled")
    assert document["message"] == (
        f"stopped by SIGTERM after sending {total} of {total} bytes to {peer.address} "
        "(its channels are reset)"
    )
    assert stderr_path.read_text().splitlines()[-1] == f"vfio-multifd: {document['message']}"
    assert {c["id"]: c["bytes"] for c in document["channels"]} == dict(
        enumerate(map(len, streams))
    )
    assert peer.ended == ["reset", "reset"]


def test_a_replay_stopped_by_sigterm_while_checking_the_recording_says_so(
    tmp_path: Path,
) -> None:
    """Reading and hashing a large recording takes a while: SIGTERM then stops it with
    its own exit code and document, not the default action (killed, nothing written)."""
    record = tmp_path / "rec"
    fake_recording(record, 1)
    huge = 256 << 30  # sparse: hashing it would take far longer than the test waits
    with open(record / channel_file(0), "r+b") as channel:
        channel.truncate(huge)
    manifest = json.loads((record / "manifest.json").read_text())
    manifest["recorded_channels"][0].update(bytes=huge, received=huge)
    (record / "manifest.json").write_text(json.dumps(manifest))
    result = tmp_path / "replayed.json"
    stderr_path = tmp_path / "replay.stderr"
    with running(
        ["replay", str(record), "--connect", closed_address(), "--result", str(result)],
        stderr_path,
    ) as proc:
        file = str(record / channel_file(0))
        wait_for(
            lambda: any(os.path.realpath(f"/proc/{proc.pid}/fd/{fd}") == file
                        for fd in os.listdir(f"/proc/{proc.pid}/fd")),
            what="the replay reading the channel file",
        )  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 143
    document = replay_ended(result, "cancelled", 143, "cancelled")
    assert document["message"] == (
        f"stopped by SIGTERM while checking the recording {record} (nothing was sent)"
    )
    assert document["channels"] == []
    assert stderr_path.read_text().splitlines()[-1] == f"vfio-multifd: {document['message']}"


def test_a_recording_that_does_not_check_out_is_a_usage_error_naming_the_file(
    tmp_path: Path,
) -> None:
    record = tmp_path / "rec"
    fake_recording(record, 2)
    file = record / channel_file(1)
    flipped = bytearray(file.read_bytes())
    recorded = xxh3(bytes(flipped))
    flipped[-1] ^= 0x01  # its size unchanged: only the digest tells
    file.write_bytes(flipped)
    result = tmp_path / "replayed.json"
    address = closed_address()  # a replay that connected would fail with exit 1, not 2
    replayed = replay_cli(record, address, "--result", str(result))
    assert replayed.returncode == 2, replayed.stderr
    document = replay_ended(result, "failed", 2, "usage")
    assert document == {
        "command": "replay", "outcome": "failed", "exit_code": 2, "reason": "usage",
        "message": f"channel 1: {file} is not what was recorded: its digest is "
                   f"{xxh3(bytes(flipped))}, the manifest says {recorded}",
        "uuid": None, "address": address, "duration_s": 0.0, "directory": str(record),
        "channels": [],
    }  # fmt: skip
    assert replayed.stderr.splitlines() == [f"vfio-multifd: error: {document['message']}"]
    assert sorted(os.listdir(record)) == ["channel-0.bin", "channel-1.bin", "manifest.json"]


def test_a_result_inside_the_recording_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    record = tmp_path / "rec"
    fake_recording(record, 1)
    manifest = (record / "manifest.json").read_bytes()
    for path in (record / "manifest.json", record / "replayed.json"):
        done = run_in_process(["replay", str(record), "--connect", closed_address(),
                               "--connect-timeout", "0.1", "--result", str(path)])  # fmt: skip
        assert done.returncode == 2
        assert done.stderr.splitlines() == [
            f"vfio-multifd: error: --result {path} is inside DIR {record}, which holds the "
            "recording and nothing else"
        ]
    assert sorted(os.listdir(record)) == ["channel-0.bin", "manifest.json"]
    assert (record / "manifest.json").read_bytes() == manifest
