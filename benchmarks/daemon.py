"""One benchmark run of a receiving process: the daemon, or the plain copy, fed a workload.

``run_receiver`` starts the process, learns its port from its JSON
``listening`` line (the daemon's on stderr, the plain copy's on stdout),
replays the workload to it (or lets another sender loose on it), and reaps
it with ``wait4`` for its CPU time (user + system, start to exit). Its peak
RSS is ``VmHWM`` from ``/proc``, sampled while it runs: ``wait4``'s
``ru_maxrss`` would carry over the RSS this process had when it spawned it.
Its idle RSS is the same figure read once when it logs ``listening``, before
any traffic: what the interpreter and the daemon's own start-up take. A
watchdog kills a receiver that outlives the run's timeout, which also
unblocks a replay stuck in ``sendmsg``.

``run_daemon`` does that for ``python -m vfio_multifd receive`` and reads
the daemon's own JSON log: ``migration_completed`` (its figures) and each
device's ``load_thread_end`` (its digest), checked against the workload.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from counters import Counts, SyscallCounter, Usage, process_usage, wait_idle
from replay import Replay, replay
from vfio_multifd.config import Address
from workload import Workload

RUN_TIMEOUT = 300.0
LISTEN_TIMEOUT = 30.0

Event = dict[str, Any]


class _Output(threading.Thread):
    """Collects a pipe's lines; JSON objects become events, and ``listening`` is signalled."""

    def __init__(self, pipe: IO[bytes], events: list[Event], listening: threading.Event) -> None:
        super().__init__(daemon=True)
        self.pipe, self.events, self.listening = pipe, events, listening
        self.lines: list[str] = []
        self.start()

    def run(self) -> None:
        for raw in iter(self.pipe.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict):
                self.events.append(event)
                if event.get("event") == "listening":
                    self.listening.set()
        self.listening.set()  # end of output: whoever waits must look at the events
        self.pipe.close()


def vm_hwm(pid: int) -> int | None:
    """The process's peak RSS so far (``VmHWM``, bytes); None once it has exited
    (a zombie has none)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            text = status.read()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return None if match is None else int(match.group(1)) * 1024


def _watch_peak_rss(pid: int, peak: list[int]) -> None:
    """Keep the process's VmHWM (bytes) until it has exited."""
    while (hwm := vm_hwm(pid)) is not None:
        peak[0] = max(peak[0], hwm)
        time.sleep(0.02)


def _named(events: list[Event], name: str) -> list[Event]:
    return [event for event in events if event.get("event") == name]


@dataclass(frozen=True)
class Listening:
    """A receiver that has logged its address: what a sender may look at while it sends."""

    pid: int
    address: Address
    logs: tuple[list[Event], ...]  # its JSON lines so far, stdout's and stderr's (growing)

    def named(self, name: str) -> list[Event]:
        return _named([event for log in self.logs for event in log], name)


#: What feeds a listening receiver (``replay_to`` unless the run says otherwise): it
#: returns when it is done with the receiver (the replay: once the receiver closed
#: every channel), or raises OSError or RuntimeError.
Sender = Callable[[Listening, Workload, float], Replay]


def replay_to(receiver: Listening, workload: Workload, timeout: float) -> Replay:
    """The replay sender: every channel's whole stream, as fast as the receiver takes it."""
    return replay(receiver.address, workload, timeout)


@dataclass
class Finished:
    """What a receiver run left behind, for its caller to judge."""

    exit_code: int
    cpu: float  # user + system seconds, start to exit
    peak_rss: int  # bytes
    events: list[Event]  # its JSON lines, stdout's then stderr's
    replay: Replay | None  # None: the replay did not run to its end
    error: str  # why the run failed: start-up, replay, exit status ("" if none)
    idle_rss: int = 0  # bytes: VmHWM when it logged ``listening`` (0: it never did)
    exited: float = 0.0  # wall clock: the process had exited
    counts: Counts = field(default_factory=Counts)  # its CPU, faults, switches, syscalls

    def named(self, name: str) -> list[Event]:
        return _named(self.events, name)


def run_receiver(
    cmd: Sequence[str],
    workload: Workload,
    timeout: float = RUN_TIMEOUT,
    send: Sender = replay_to,
    started: Callable[[int], object] | None = None,
    *,
    count_syscalls: bool = False,
    settle: bool = False,
) -> Finished:
    """Start ``cmd``, ``send`` ``workload`` to the address it logs (replay it), reap it.
    ``started`` is called with the process id at once (profile_receive.py watches it);
    ``count_syscalls`` attaches ``perf stat`` to it (counters.py; nothing without perf),
    and nothing is sent before perf counts;
    ``settle``: the first byte goes out only once it is idle (as a destination is
    before a real stop-copy: started, listening, waiting)."""
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    counter = SyscallCounter(proc.pid) if count_syscalls else None
    if started is not None:
        started(proc.pid)
    assert proc.stdout is not None and proc.stderr is not None
    listening = threading.Event()
    out_events: list[Event] = []
    err_events: list[Event] = []
    outputs = [
        _Output(proc.stdout, out_events, listening),
        _Output(proc.stderr, err_events, listening),
    ]
    peak = [0]
    watcher = threading.Thread(target=_watch_peak_rss, args=(proc.pid, peak), daemon=True)
    watcher.start()
    watchdog = threading.Timer(timeout, _kill, args=(proc.pid, signal.SIGKILL))
    watchdog.daemon = True
    watchdog.start()
    sent: Replay | None = None
    error = ""
    idle = 0
    startup = Usage()
    try:
        wait = min(LISTEN_TIMEOUT, timeout)
        listening.wait(wait)
        address = next(
            (e["address"] for e in out_events + err_events if e.get("event") == "listening"), None
        )
        if address is None:
            raise RuntimeError(f"no listening address logged (it exited, or {wait:.0f} s passed)")
        idle = vm_hwm(proc.pid) or 0
        if counter is not None:
            counter.wait_attached()
        if settle:
            wait_idle(proc.pid)
        startup = process_usage(proc.pid)
        receiver = Listening(proc.pid, Address.parse(str(address)), (out_events, err_events))
        sent = send(receiver, workload, timeout)
    except (OSError, RuntimeError) as exc:
        error = str(exc) or type(exc).__name__
        _kill(proc.pid, signal.SIGTERM)
    except BaseException:  # interrupted: leave no receiver behind
        _kill(proc.pid, signal.SIGKILL)
        raise
    # Exited but not reaped: its pid cannot be reused, so the watchdog may still fire harmlessly.
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    exited = time.time()
    watchdog.cancel()
    watchdog.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for output in outputs:
        output.join(10)
    watcher.join(1)
    if proc.returncode != 0:
        tail = " | ".join(outputs[1].lines[-2:])  # stderr: where both say why they failed
        error = "; ".join(filter(None, [error, f"exit status {proc.returncode}: {tail}"]))
    syscalls = {} if counter is None else counter.result()
    return Finished(
        exit_code=proc.returncode,
        cpu=usage.ru_utime + usage.ru_stime,
        peak_rss=max(peak[0], idle),  # VmHWM only grows: a run too short to sample
        events=out_events + err_events,
        replay=sent,
        error=error,
        idle_rss=idle,
        exited=exited,
        counts=Counts.of(usage, startup, syscalls),
    )


def _option(options: Sequence[str], name: str) -> str | None:
    """The value of ``name VALUE`` (the last one) among ``options``, if any."""
    values = [options[i + 1] for i, option in enumerate(options[:-1]) if option == name]
    return values[-1] if values else None


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, sig)


def timestamp(event: Event) -> float:
    """An event's wall-clock time (the daemon logs ISO 8601, UTC)."""
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


# --- the daemon -----------------------------------------------------------------------------


def daemon_command(workload: Workload, out_dir: Path | None, *options: str) -> list[str]:
    """``receive`` on a free 127.0.0.1 port, JSON logs, every device of ``workload``
    written to ``out_dir`` (``dev<n>.bin`` and ``.cfg``) or, without one, to /dev/null."""
    cmd = [sys.executable, "-m", "vfio_multifd", "receive", "--listen", "tcp:127.0.0.1:0"]
    cmd += ["--log-format", "json", "--channels", str(workload.channels), *options]
    for n, state in enumerate(workload.devices):
        data = os.devnull if out_dir is None else str(out_dir / f"dev{n}.bin")
        config = os.devnull if out_dir is None else str(out_dir / f"dev{n}.cfg")
        key = state.key
        cmd += [
            "--device",
            f"idstr={key.idstr},instance={key.instance_id},data={data},config={config}",
        ]
    return cmd


@dataclass
class DaemonRun:
    """One daemon run as the daemon itself reports it (``migration_completed``)."""

    ok: bool  # exited 0, reported every device, every digest as expected
    error: str = ""
    seconds: float = 0.0  # first byte received -> last device complete
    mb_per_s: float = 0.0
    bytes: int = 0  # data bytes
    peak_queued_bytes: int = 0
    spilled_bytes: int = 0
    paused_seconds: float = 0.0
    reader_threads: int = 0  # as the daemon reports it
    buffers_allocated: int = 0  # payload buffers mapped anew (pool misses)
    cpu: float = 0.0  # user + system, start to exit
    peak_rss: int = 0
    idle_rss: int = 0  # VmHWM before any traffic
    lag: float = 0.0  # wall clock: the replay's last sendmsg -> the last load_thread_end
    exit_lag: float = 0.0  # wall clock: the replay's last sendmsg -> the process exited
    digests: dict[str, str] = field(default_factory=dict)  # device -> digest
    counts: Counts = field(default_factory=Counts)
    finished: float = 0.0  # wall clock: the last device complete (its load_thread_end)
    exited: float = 0.0  # wall clock: the process had exited
    events: list[Event] = field(default_factory=list)  # its JSON log


def run_daemon(
    workload: Workload,
    out_dir: Path | None,
    *options: str,
    timeout: float = RUN_TIMEOUT,
    send: Sender = replay_to,
    count_syscalls: bool = False,
    prefix: Sequence[str] = (),
    settle: bool = False,
) -> DaemonRun:
    """One daemon run; ``send`` feeds it (the replay by default; a TLS replay with
    ``--tls-creds`` among ``options``); ``prefix`` goes before the command (an ``env``
    that execs it: compare.py runs another version of the package so)."""
    command = [*prefix, *daemon_command(workload, out_dir, *options)]
    finished = run_receiver(
        command, workload, timeout, send, count_syscalls=count_syscalls, settle=settle
    )
    run = DaemonRun(
        ok=False,
        error=finished.error,
        cpu=finished.cpu,
        peak_rss=finished.peak_rss,
        idle_rss=finished.idle_rss,
        counts=finished.counts,
        exited=finished.exited,
        events=finished.events,
    )
    ends = finished.named("load_thread_end")
    run.digests = {str(e.get("device")): str(e.get("digest")) for e in ends}
    completed = finished.named("migration_completed")
    if run.error or finished.replay is None:
        return run
    if not completed:
        run.error = "no migration_completed event"
        return run
    summary = completed[-1]
    run.seconds = float(summary["seconds"])
    run.mb_per_s = float(summary["bytes_per_s"]) / 1e6
    run.bytes = int(summary["bytes"])
    run.peak_queued_bytes = int(summary["peak_queued_bytes"])
    run.spilled_bytes = int(summary["spilled_bytes"])
    run.paused_seconds = float(summary["paused_seconds"])
    run.reader_threads = int(summary.get("reader_threads", 0))
    run.buffers_allocated = int(summary.get("buffers_allocated", 0))
    run.finished = max(timestamp(e) for e in ends) if ends else 0.0
    run.lag = run.finished - finished.replay.sent if ends else 0.0
    run.exit_lag = finished.exited - finished.replay.sent
    expected = workload.expected_digests
    if _option(options, "--digest") == "none":  # nothing to compare: the bytes are counted
        expected = dict.fromkeys(expected, "none")
    if run.digests != expected or run.bytes != workload.size:
        wrong = sorted(d for d in expected if run.digests.get(d) != expected[d])
        run.error = f"{run.bytes} of {workload.size} bytes; digest differs for {wrong}"
        return run
    run.ok = True
    return run
