"""``vfio-multifd send`` as a user runs it: what its exit code means, and errors
that name the address and the channel."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from cli_helpers import SENDER_RESET, TOOL, TRACEBACK, Daemon, digests, receiver, run, wait_for
from helpers import IDSTR, closed_address, random_bytes

from vfio_multifd import Address, Reason


def events(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_exit_0_means_the_daemon_completed_the_migration(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon, out = receiver(tmp_path, daemons, "--channels", "2")
    source = tmp_path / "source.bin"
    source.write_bytes(random_bytes(3 << 20, 41))
    sent = run(["send", "--connect", daemon.address, "--device", f"idstr={IDSTR},source={source}"])
    assert sent.returncode == 0, sent.stderr
    # The sender returned only once the daemon closed every channel, which it does
    # with its outputs in place.
    assert sorted(os.listdir(out)) == ["a.bin", "a.bin.config"]
    assert (out / "a.bin").read_bytes() == source.read_bytes()
    assert re.fullmatch(
        r"sent 3145728 bytes in [\d.]+ s \([\d.]+ MB/s\) over 2 channels; "
        r"the daemon closed every channel cleanly: it completed the migration",
        sent.stdout.splitlines()[-1],
    ), sent.stdout
    assert daemon.finish()[0] == 0


def test_progress_lines_count_in_numbers_and_end_at_the_summary_rate(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Devices were "771751936/1073741824" strings, and the last line's rate (over its
    interval) was not the summary's (the average)."""
    daemon, _ = receiver(tmp_path, daemons, "--channels", "2")
    sent = run(["send", "--connect", daemon.address, "--device", f"idstr={IDSTR},size=8M",
                "--progress-interval", "0.01", "--log-format", "json"])  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert daemon.finish()[0] == 0
    lines = [e for e in events(sent.stderr) if e["event"] == "send_progress"]
    assert lines, sent.stderr
    for line in lines:
        (device,) = dict(line["devices"]).values()  # type: ignore[call-overload]
        assert device["size"] == 8 << 20 and isinstance(device["bytes"], int)
        assert device["bytes"] == line["bytes"] and isinstance(line["bytes_per_s"], int)
    last = lines[-1]
    assert last["bytes"] == 8 << 20
    summary = re.fullmatch(r"sent 8388608 bytes in ([\d.]+) s \(([\d.]+) MB/s\) .*",
                           sent.stdout.splitlines()[-1])  # fmt: skip
    assert summary is not None, sent.stdout
    assert f"{last['seconds']:.3f}" == summary.group(1)
    assert f"{int(str(last['bytes_per_s'])) / 1e6:.1f}" == summary.group(2)
    (completed,) = [e for e in daemon.events() if e["event"] == "migration_completed"]
    assert isinstance(completed["bytes_per_s"], int) and "mb_per_s" not in completed


@pytest.mark.parametrize(
    ("device", "inject", "daemon_error"),
    [
        (f"idstr={IDSTR},size=2M", "duplicate", "state buffer 0 already filled"),
        (f"idstr={IDSTR},size=2M", "missing", "missing 1 of 2 chunks (idx 0"),
        (f"idstr={IDSTR},size=2M", "bad-config", "starts with 0x0000000000000000"),
        ("idstr=0000:00:09.0/vfio,size=2M", None, "unknown device"),
    ],
    ids=["duplicate", "missing", "bad-config", "wrong idstr"],
)
def test_a_migration_the_daemon_rejects_is_exit_1_for_the_sender(
    tmp_path: Path, daemons: list[Daemon], device: str, inject: str | None, daemon_error: str
) -> None:
    """It exited 0: the daemon's verdict never reached it."""
    daemon, out = receiver(tmp_path, daemons, "--channels", "2")
    faults = ["--inject", inject] if inject else []
    sent = run(["send", "--connect", daemon.address, "--device", device, *faults])
    code, _, stderr = daemon.finish()
    assert code == 1 and daemon_error in stderr.splitlines()[-1], stderr
    assert sent.returncode == 1, sent.stderr
    assert re.fullmatch(SENDER_RESET.format(address=re.escape(daemon.address)), sent.stderr.splitlines()[-1])
    assert sent.stdout == "" and TRACEBACK not in sent.stderr
    assert os.listdir(out) == []


def test_connecting_says_it_retries_and_until_when_then_names_address_and_channel() -> None:
    address = closed_address()
    sent = run(
        ["send", "--connect", address, "--connect-timeout", "0.5", "--log-format", "json",
         "--device", "idstr=a,size=1M"],
        timeout=30,
    )  # fmt: skip
    assert sent.returncode == 1
    assert sent.stderr.splitlines()[-1] == (
        f"vfio-multifd: error: channel 0: cannot connect to {address} within 0.5 s "
        "(--connect-timeout): Connection refused (ECONNREFUSED, errno 111)"
    )
    [retrying] = [e for e in events(sent.stderr) if e["event"] == "connect_retrying"]
    assert retrying["channel"] == 0 and retrying["address"] == address
    assert retrying["error"] == "Connection refused (ECONNREFUSED, errno 111)"
    assert retrying["connect_timeout"] == 0.5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(retrying["until"]))
    assert sent.stdout == ""


def sender(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / "send.stderr"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [*TOOL, "send", "--log-format", "json", "--progress-interval", "0.1", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    return proc, log


def logged(log: Path, event: str) -> list[dict[str, object]]:
    text = log.read_text()
    return [e for e in events(text[: text.rfind("\n") + 1]) if e["event"] == event]


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_a_signal_mid_transfer_says_what_was_sent(tmp_path: Path, signum: int, code: int) -> None:
    """It exited 130 with no message. The listener here never reads: the sender blocks."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"tcp:127.0.0.1:{listener.getsockname()[1]}"
        proc, log = sender(tmp_path, "--connect", address, "--channels", "1",
                           "--device", "idstr=a,size=64M")  # fmt: skip
        try:
            wait_for(
                lambda: any(int(str(e["bytes"])) > 0 for e in logged(log, "send_progress")),
                what="the first chunks to be sent",
            )
            proc.send_signal(signum)
            out, _ = proc.communicate(timeout=20)
        finally:
            proc.kill()
    assert (proc.returncode, out) == (code, ""), log.read_text()
    last = log.read_text().splitlines()[-1]
    name = signal.Signals(signum).name
    assert re.fullmatch(
        rf"vfio-multifd: stopped by {name} after sending [1-9]\d* of 67108864 data bytes "
        rf"\([1-9]\d* of 65 packets\) to {re.escape(address)}: the migration is incomplete "
        r"\(its channels are reset\)",
        last,
    ), last


def test_sigint_while_waiting_for_the_daemon_says_everything_was_sent(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = Daemon(tmp_path, "--channels", "3", "--device", f"idstr={IDSTR},data={tmp_path / 'a.bin'}")
    daemons.append(daemon)
    proc, log = sender(tmp_path, "--connect", daemon.address, "--channels", "2",
                       "--device", f"idstr={IDSTR},size=1M")  # fmt: skip
    try:
        wait_for(lambda: bool(logged(log, "waiting_for_daemon")), what="everything sent")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert (proc.returncode, out) == (130, ""), log.read_text()
    assert log.read_text().splitlines()[-1] == (
        f"vfio-multifd: stopped by SIGINT after sending all 1048576 of 1048576 data bytes "
        f"(2 of 2 packets) to {daemon.address}, before the daemon closed the channels: it had "
        "not completed the migration yet"
    )


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(errno.ECONNRESET, "reset"),
        BrokenPipeError(errno.EPIPE, "broken pipe"),
        OSError(errno.ENOTCONN, "Transport endpoint is not connected"),
    ],
)
def test_a_connection_the_daemon_reset_is_its_verdict_however_the_kernel_says_it(
    error: OSError,
) -> None:
    """shutdown(SHUT_WR) after the daemon's reset has arrived fails with ENOTCONN, not
    ECONNRESET: that is the daemon's reset all the same (it once read as a send failure)."""
    from vfio_multifd.source.channels import channel_error as _channel_error

    address = Address("tcp", "127.0.0.1", 4444)
    verdict = _channel_error(2, address, error, sent=100)
    assert verdict.reason is Reason.CHANNEL_RESET and verdict.channel == 2
    assert "the daemon reset the connection after this channel sent all its 100 bytes" in str(
        verdict
    )
    other = _channel_error(2, address, OSError(errno.EHOSTUNREACH, "no route"), sent=None)
    assert other.reason is Reason.SEND_FAILED


def test_send_ram_acts_like_qemu_10_to_a_daemon_taking_the_main_stream(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """send --ram 8M: a main channel, RAM and SYNC packets in rounds with a device's state
    packets among them; the daemon keeps pc.ram equal to the guest's last round."""
    from vfio_multifd.source.qemu_like import guest_ram

    source = tmp_path / "source.bin"
    source.write_bytes(random_bytes((2 << 20) + 5, 42))
    data = tmp_path / "dev.bin"
    daemon = Daemon(
        tmp_path,
        "--channels", "3",
        "--main-stream", str(tmp_path / "main.bin"),
        "--ram", str(tmp_path / "ram"),
        "--device", f"idstr={IDSTR},data={data}",
        "--result", str(tmp_path / "result.json"),
    )  # fmt: skip
    daemons.append(daemon)
    sent = run(["send", "--connect", daemon.address, "--channels", "3", "--ram", "8M",
                "--seed", "7", "--device", f"idstr={IDSTR},source={source}"])  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    code, summary, stderr = daemon.finish(60)
    assert code == 0, stderr
    ram = (tmp_path / "ram" / "pc.ram").read_bytes()
    rounds = guest_ram(8 << 20, 7)
    assert len(rounds) == 3 and rounds[0] != rounds[-1]
    assert ram == rounds[-1]["pc.ram"]
    assert ram != guest_ram(8 << 20, 8)[-1]["pc.ram"]  # the seed decides the bytes
    assert ram.count(0) < len(ram)  # not just holes
    assert data.read_bytes() == source.read_bytes()
    assert os.listdir(tmp_path / "ram") == ["pc.ram"]
    match = re.search(
        r"^ram: pc.ram 8388608 bytes in 3 rounds: (\d+) pages, (\d+) zero pages, "
        r"(\d+) sync points; main stream (\d+) bytes$",
        sent.stdout,
        re.MULTILINE,
    )
    assert match is not None, sent.stdout
    pages, zero, syncs, main = map(int, match.groups())
    assert (tmp_path / "main.bin").stat().st_size == main
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["ram_pages"], result["ram_zero_pages"], result["sync_points"]) == (
        pages, zero, syncs,
    )  # fmt: skip
    assert result["main_stream_bytes"] == main
    assert digests(summary) == digests(sent.stdout) != {}


def test_send_ram_needs_a_whole_number_of_pages_and_round_robin(tmp_path: Path) -> None:
    for extra, message in (
        (["--ram", "5000"], "--ram 5000: the RAM size is a non-zero multiple of 4096 bytes"),
        (["--ram", "8M", "--order", "random"], "--ram sends as QEMU does: --order round-robin"),
    ):
        sent = run(["send", "--connect", "tcp:127.0.0.1:9", *extra])
        assert sent.returncode == 2, sent.stderr
        assert message in sent.stderr
    sent = run(["send", "--connect", "tcp:127.0.0.1:9"])
    assert sent.returncode == 2
    assert "at least one --device is required (or --ram SIZE)" in sent.stderr
