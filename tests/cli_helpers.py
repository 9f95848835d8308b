"""Helpers for tests that run the command line as real processes."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import qemu_source as qs
from helpers import IDSTR, connect, random_bytes, reset_logging

from vfio_multifd.cli import main

TOOL = [sys.executable, "-m", "vfio_multifd"]
TRACEBACK = "Traceback (most recent call last)"
#: The sender's last line when the daemon reset a channel (``address``: re.escape'd).
SENDER_RESET = (
    r"vfio-multifd: error: channel \d+: {address}: the daemon reset the connection "
    r"(while this channel was sending|after this channel sent all its \d+ bytes): it refused "
    r"this channel or the migration failed \(the daemon's error says which"
    r"(; a daemon whose --channels is not \d+, as here, does either)?\)"  # send's, not replay's
)

#: ``--event-loop`` of every ``receive`` and ``send`` these helpers start; the
#: ``cli_loop`` fixture (conftest.py) runs a test once with each.
EVENT_LOOP = "uvloop"


def with_event_loop(args: Sequence[str]) -> list[str]:
    """``args`` with ``--event-loop EVENT_LOOP`` after a ``receive`` or ``send``."""
    if args and args[0] in ("receive", "send"):
        return [args[0], "--event-loop", EVENT_LOOP, *args[1:]]
    return list(args)


class Daemon:
    """``vfio-multifd receive`` in a subprocess, listening and ready."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        ready_timeout: float = 20.0,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.stderr_path = workdir / "daemon.stderr"
        read_end, write_end = os.pipe()
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [
                    *TOOL,
                    "receive",
                    "--event-loop",
                    EVENT_LOOP,
                    "--listen",
                    "tcp:127.0.0.1:0",
                    "--ready-fd",
                    str(write_end),
                    "--log-format",
                    "json",
                    "--no-fsync",
                    *args,
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                pass_fds=(write_end,),
                env=env,
                preexec_fn=preexec_fn,
                text=True,
            )
        os.close(write_end)
        try:
            readable, _, _ = select.select([read_end], [], [], ready_timeout)
            self.ready_byte = os.read(read_end, 16) if readable else None
        finally:
            os.close(read_end)
        if not self.ready_byte:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"daemon not ready: {self.stderr()}")
        self.address = next(
            str(event["address"]) for event in self.events() if event["event"] == "listening"
        )
        maps = Path(f"/proc/{self.proc.pid}/maps")
        if maps.exists():  # the loop asked for is the loop it runs: uvloop loaded or not
            uvloop_loaded = "/uvloop/" in maps.read_text()
            assert uvloop_loaded == (EVENT_LOOP == "uvloop"), f"--event-loop {EVENT_LOOP}"

    def events(self) -> list[dict[str, object]]:
        """The JSON log lines so far."""
        events = []
        text = self.stderr()
        for line in text[: text.rfind("\n") + 1].splitlines():  # whole lines only
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def finish(self, timeout: float = 30.0) -> tuple[int, str, str]:
        """Exit code, stdout and stderr once the daemon exits."""
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, self.stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def one_device_daemon(
    tmp_path: Path,
    daemons: list[Daemon],
    channels: int,
    *options: str,
    preexec_fn: Callable[[], None] | None = None,
) -> tuple[Daemon, Path]:
    """A daemon receiving IDSTR into ``tmp_path/out/a.bin`` (returned), registered in
    ``daemons`` to be killed after the test."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    data = out / "a.bin"
    daemon = Daemon(
        tmp_path,
        "--channels",
        str(channels),
        *options,
        "--device",
        f"idstr={IDSTR},data={data}",
        preexec_fn=preexec_fn,
    )
    daemons.append(daemon)
    return daemon, data


#: Subcommands :func:`run` runs in this process: what their process adds (an exit
#: code from ``main``'s return, stdout and stderr) is what ``main(argv)`` gives, and
#: starting Python and importing the package again costs ~0.3 s a run. ``receive``
#: runs in a process of its own (:class:`Daemon`): signals, readiness, /proc.
IN_PROCESS = frozenset({"send", "replay", "status"})


def run(args: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``vfio-multifd ARGS`` under ``EVENT_LOOP``: in this process for the subcommands
    in :data:`IN_PROCESS` (bounded by pytest's timeout, not ``timeout``), else in a
    subprocess, killed after ``timeout`` seconds."""
    argv = with_event_loop(args)
    if argv and argv[0] in IN_PROCESS:
        return run_in_process(argv)
    return run_process(argv, timeout)


def run_process(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``vfio-multifd ARGV`` in a subprocess, as typed (no ``--event-loop`` added)."""
    return subprocess.run(
        [*TOOL, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_in_process(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """``main(argv)`` here, its stdout and stderr captured (log lines included: they go
    to whatever ``sys.stderr`` is); an exception it lets out fails the test, as a
    traceback would. Logging is back to its defaults afterwards."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        reset_logging()
        gc.unfreeze()  # receive freezes what it allocated before the migration
    return subprocess.CompletedProcess([*TOOL, *argv], code, out.getvalue(), err.getvalue())


def usage_error(args: Sequence[str]) -> str:
    """Run ``vfio-multifd ARGS`` (under ``EVENT_LOOP``) in this process; it must be a
    usage error: exit 2, nothing on stdout, no exception. Returns its last line on
    stderr. Most are decided while parsing, before any loop runs: a test of those runs
    once, not under each loop (``cli_loop``)."""
    result = run_in_process(with_event_loop(args))
    assert result.returncode == 2, result.stderr
    assert result.stdout == "", result.stdout
    return result.stderr.splitlines()[-1]


def send_to(
    address: str, channels: int, device: str, *extra: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``vfio-multifd send`` of one device over ``channels`` channels, JSON logs."""
    return run(
        [
            "send",
            "--connect",
            address,
            "--channels",
            str(channels),
            "--device",
            device,
            "--log-format",
            "json",
            *extra,
        ],
        timeout=timeout,
    )


def digests(summary: str) -> dict[str, str]:
    return dict(re.findall(r"^device (\S+): .*?(xxh3-128:[0-9a-f]{32})", summary, re.MULTILINE))


def partial_stream(
    address: str, *, channels: int, chunks: int, chunk_size: int
) -> list[socket.socket]:
    """Open every channel and send ``chunks`` data chunks of IDSTR, never the rest."""
    socks = [connect(address) for _ in range(channels)]
    for n, sock in enumerate(socks):
        sock.sendall(qs.handshake(n))
    data = random_bytes(chunk_size, 5)
    for idx in range(chunks):
        socks[0].sendall(qs.device_packet(IDSTR, 0, idx, data))
    return socks


def wait_for(predicate: object, timeout: float = 10.0, what: str = "condition") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def part_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".part"))


def receive_usage_error(tmp_path: Path, *options: str) -> str:
    """Run ``receive`` with one device in ``tmp_path`` and ``options``, which must make
    it a usage error (see :func:`usage_error`). Returns its last line on stderr."""
    return usage_error(
        [
            "receive",
            *options,
            "--device",
            f"idstr=a,data={tmp_path / 'a.bin'}",
            "--log-format",
            "json",
        ]
    )


def receiver(tmp_path: Path, daemons: list[Daemon], *args: str) -> tuple[Daemon, Path]:
    """A daemon (with ``args``) receiving one device, IDSTR, into ``tmp_path/out/a.bin``;
    returns it (registered in ``daemons``, the fixture that kills it) and ``out``."""
    out = tmp_path / "out"
    out.mkdir()
    daemon = Daemon(tmp_path, *args, "--device", f"idstr={IDSTR},data={out / 'a.bin'}")
    daemons.append(daemon)
    return daemon, out
