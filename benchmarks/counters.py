"""What a receiving process costs per GB: syscalls, futex calls, context switches, page faults, CPU.

Every benchmark that compares receivers reports these the same way, from
this module. The process's own figures come from ``wait4`` (user and system
time, minor + major page faults, voluntary + involuntary context switches:
always there); its CPU at start-up is read from ``/proc/PID/stat`` when it
logs ``listening``, so CPU can be given with and without it. Syscall counts
come from ``perf stat -p PID`` on the ``syscalls:`` tracepoints, attached
as the process starts (it follows the threads the process creates later; the
first byte waits until it counts);
where perf or its tracepoints are not usable they are left out (``-``).

On loopback part of the sender's work runs in whichever process reads (a
read that opens the TCP window runs the sender's transmit path), so a
receiver's CPU alone can flatter it: :func:`sender_cpu` wraps a sender to
note this process's CPU while it sends, and the report gives both ends.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon import Listening, Sender
    from replay import Replay
    from workload import Workload

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: Each counted figure and the syscall tracepoints it adds up.
SYSCALLS: dict[str, tuple[str, ...]] = {
    "reads": ("read", "readv", "recvfrom", "recvmsg"),
    "writes": ("write", "writev", "pwritev", "pwrite64"),
    "futex": ("futex",),
    "epoll": ("epoll_wait", "epoll_pwait", "epoll_pwait2"),
}


@functools.cache
def perf_command() -> str | None:
    """``perf`` if it can count syscall tracepoints here, else None."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    try:
        probe = subprocess.run(
            [perf, "stat", "-x", ",", "-e", "syscalls:sys_enter_read", "true"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return perf if probe.returncode == 0 and b"sys_enter_read" in probe.stderr else None


def _tracepoints() -> list[str]:
    """The :data:`SYSCALLS` tracepoints this kernel has."""
    events = [f"syscalls:sys_enter_{call}" for calls in SYSCALLS.values() for call in calls]
    return [event for event in events if _tracepoint_exists(event)]


def _perf_stat(perf: str, pid: int, output: str) -> subprocess.Popen[bytes]:
    """``perf stat`` of every :data:`SYSCALLS` tracepoint there is, attached to ``pid``."""
    command = [perf, "stat", "-x", ",", "-o", output, "-p", str(pid)]
    command += [arg for event in _tracepoints() for arg in ("-e", event)]
    return subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _perf_events_open(pid: int) -> int:
    """How many perf event descriptors process ``pid`` holds (0 once it is gone)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    count = 0
    for fd in fds:
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]"
    return count


class SyscallCounter:
    """``perf stat`` attached to a running process and every thread it creates."""

    def __init__(self, pid: int) -> None:
        self.perf = perf_command()
        self.proc: subprocess.Popen[bytes] | None = None
        if self.perf is None:
            return
        handle, name = tempfile.mkstemp(prefix="vfio-multifd-perf-", suffix=".csv")
        os.close(handle)
        self.output = Path(name)
        self.proc = _perf_stat(self.perf, pid, name)

    def wait_attached(self, timeout: float = 10.0) -> None:
        """Until perf has opened a counter per tracepoint, at most ``timeout`` seconds:
        from then on what the process does is counted (a sender waits for this)."""
        if self.proc is None:
            return
        wanted = len(_tracepoints())
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if _perf_events_open(self.proc.pid) >= wanted:
                return
            if time.monotonic() > deadline:  # counting part of the run: a failed run
                raise RuntimeError(f"perf stat did not start counting within {timeout:g} s")
            time.sleep(0.005)

    def result(self, timeout: float = 30.0) -> dict[str, int]:
        """Once the process has exited: each figure of :data:`SYSCALLS` (empty without perf)."""
        if self.proc is None:
            return {}
        # Attached to a pid, perf looks for its exit once a second; the process is gone
        # and its counts final, so SIGINT (perf's "stop and report") spares that wait.
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return {}
        finally:
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        try:
            text = self.output.read_text()
        finally:
            with contextlib.suppress(OSError):
                self.output.unlink()
        by_call: dict[str, int] = {}
        for line in text.splitlines():
            fields = line.split(",")
            if len(fields) < 3 or not fields[2].startswith("syscalls:sys_enter_"):
                continue
            with contextlib.suppress(ValueError):
                by_call[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0])
        if not by_call:
            return {}
        return {
            name: sum(by_call.get(call, 0) for call in calls) for name, calls in SYSCALLS.items()
        }


@contextlib.contextmanager
def tracepoints_held() -> Iterator[None]:
    """Keep the :data:`SYSCALLS` tracepoints registered meanwhile (a ``perf stat`` on an
    idle child), so that each :class:`SyscallCounter` lets go of them at once.

    The last user of a tracepoint waits for an RCU grace period as it lets go of it,
    one tracepoint after another: paid once here rather than after every run (a
    many-run caller such as the smoke test is the quicker for it). Each run's perf
    still counts its own process only. Without perf it does nothing."""
    perf = perf_command()
    if perf is None:
        yield
        return
    idle = subprocess.Popen(["sleep", "infinity"], stdin=subprocess.DEVNULL)
    holder = _perf_stat(perf, idle.pid, os.devnull)
    try:
        yield
    finally:
        holder.send_signal(signal.SIGINT)
        try:
            holder.wait(30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        finally:
            if holder.stderr is not None:
                holder.stderr.close()
            idle.kill()
            idle.wait()


@functools.cache
def _tracepoint_exists(event: str) -> bool:
    name = event.removeprefix("syscalls:")
    return any(
        Path(root, "events/syscalls", name).is_dir()
        for root in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
    )


def process_cpu(pid: int) -> float:
    """User + system seconds the process (all its threads) has used so far; 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass(frozen=True)
class Usage:
    """What a process has used so far (read from /proc while it runs)."""

    cpu: float = 0.0  # user + system seconds
    faults: int = 0  # minor + major page faults
    reads: int = 0  # read(2)-family calls on files and pipes (/proc/PID/io syscr)


def process_usage(pid: int) -> Usage:
    """The process's usage so far; zeros once it is gone. Before its first byte its
    reads are its start-up's (imports): ``syscr`` counts those; ``recvfrom`` on a
    socket it does not, so it is read only then."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        io = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return Usage()
    fields = stat[stat.rindex(")") + 2 :].split()
    syscr = next((int(line.split()[1]) for line in io.splitlines() if line.startswith("syscr:")), 0)
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return Usage(cpu, int(fields[7]) + int(fields[9]), syscr)


#: A receiver counts as settled once it has listened this long and its CPU time
#: has not grown for IDLE_FOR (a destination is started well before a stop-copy).
LISTEN_FOR = 0.5
IDLE_FOR = 0.05
IDLE_TIMEOUT = 10.0


def wait_idle(pid: int) -> None:
    """Until the process has listened :data:`LISTEN_FOR` seconds and used no CPU for
    :data:`IDLE_FOR` (its start-up, and what it does while waiting for its channels,
    done), at most :data:`IDLE_TIMEOUT`."""
    start = time.monotonic()
    deadline = start + IDLE_TIMEOUT
    cpu = process_cpu(pid)
    quiet_since = start
    while (
        time.monotonic() - quiet_since < IDLE_FOR or time.monotonic() - start < LISTEN_FOR
    ) and time.monotonic() < deadline:
        time.sleep(0.01)
        now = process_cpu(pid)
        if now != cpu:
            cpu, quiet_since = now, time.monotonic()


@dataclass
class Counts:
    """One receiver run's totals (not yet per GB)."""

    user: float = 0.0
    system: float = 0.0
    startup: float = 0.0  # CPU seconds used before the first byte was sent to it
    faults: int = 0  # minor + major page faults
    startup_faults: int = 0  # of which before the first byte
    startup_reads: int = 0  # read calls before the first byte (its imports)
    ctx_switches: int = 0  # voluntary + involuntary
    syscalls: dict[str, int] = field(default_factory=dict)  # SYSCALLS' figures (perf)
    sender: float | None = None  # CPU seconds of the sender meanwhile (None: not measured)

    @classmethod
    def of(cls, usage: resource.struct_rusage, startup: Usage, syscalls: dict[str, int]) -> Counts:
        """From ``wait4``'s usage, the usage before the first byte, perf's counts."""
        return cls(
            user=usage.ru_utime,
            system=usage.ru_stime,
            startup=startup.cpu,
            startup_faults=startup.faults,
            startup_reads=startup.reads,
            faults=usage.ru_minflt + usage.ru_majflt,
            ctx_switches=usage.ru_nvcsw + usage.ru_nivcsw,
            syscalls=syscalls,
        )

    @property
    def cpu(self) -> float:
        return self.user + self.system


def _less(total: int | None, startup: int) -> int | None:
    return None if total is None else total - startup


def sender_cpu(send: Sender, into: Callable[[float], object]) -> Sender:
    """``send``, passing ``into`` the CPU seconds this process spent while it ran
    (its sending threads, plus the harness's few reader threads)."""

    def run(receiver: Listening, workload: Workload, timeout: float) -> Replay:
        before = resource.getrusage(resource.RUSAGE_SELF)
        try:
            return send(receiver, workload, timeout)
        finally:
            after = resource.getrusage(resource.RUSAGE_SELF)
            into(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)

    return run


#: The per-GB table's columns: heading, how to get the figure from a run's Counts.
COLUMNS: tuple[tuple[str, Callable[[Counts], float | None]], ...] = (
    ("reads", lambda c: c.syscalls.get("reads")),
    ("reads w/o start", lambda c: _less(c.syscalls.get("reads"), c.startup_reads)),
    ("futex", lambda c: c.syscalls.get("futex")),
    ("epoll", lambda c: c.syscalls.get("epoll")),
    ("writes", lambda c: c.syscalls.get("writes")),
    ("ctx sw", lambda c: c.ctx_switches),
    ("faults", lambda c: c.faults),
    ("faults w/o start", lambda c: c.faults - c.startup_faults),
    ("user s", lambda c: c.user),
    ("sys s", lambda c: c.system),
    ("CPU s", lambda c: c.cpu),
    ("CPU w/o start", lambda c: c.cpu - c.startup),
    ("+sender", lambda c: None if c.sender is None else c.cpu + c.sender),
)
_SECONDS = {"user s", "sys s", "CPU s", "CPU w/o start", "+sender"}


def per_gb_medians(runs: Sequence[Counts], data_bytes: int) -> dict[str, float | None]:
    """Each column's median over ``runs``, per 1e9 data bytes (None: not measured)."""
    medians: dict[str, float | None] = {}
    for heading, get in COLUMNS:
        values = [v for v in (get(run) for run in runs) if v is not None]
        medians[heading] = statistics.median(values) / (data_bytes / 1e9) if values else None
    return medians


def format_per_gb(rows: Sequence[tuple[str, Sequence[Counts], int]]) -> list[str]:
    """A table, one row per ``(label, runs, data bytes per run)``: medians per GB,
    then for every row after the first its ratio to the first (the baseline)."""
    table = [(label, per_gb_medians(runs, size)) for label, runs, size in rows]
    header = ["per GB (medians)", *(heading for heading, _ in COLUMNS)]
    lines = [header]

    def cell(heading: str, value: float | None) -> str:
        if value is None:
            return "-"
        return format(value, ".3f" if heading in _SECONDS else ",.0f")

    for label, medians in table:
        lines.append([label, *(cell(heading, medians[heading]) for heading, _ in COLUMNS)])
    if len(table) > 1:
        _, base = table[0]
        for label, medians in table[1:]:
            ratios: list[str] = []
            for heading, _ in COLUMNS:
                b, v = base[heading], medians[heading]
                ratios.append("-" if b is None or v is None or b <= 0 else f"{v / b:.2f}x")
            lines.append([f"{label}/{table[0][0]}", *ratios])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell_text.ljust(w) if i == 0 else cell_text.rjust(w)
            for i, (cell_text, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    text.insert(1, "-" * len(text[0]))
    return text


LEGEND = (
    "reads = read/readv/recvfrom/recvmsg syscalls (w/o start: less the reads it had made "
    "before the first byte, its imports), writes = write/writev, futex and epoll "
    "= their syscalls (perf stat on syscall tracepoints; '-': perf unusable here); ctx sw = "
    "voluntary + involuntary context switches, faults = minor + major page faults (faults w/o "
    "start: those from the first byte on), user s / sys s / CPU s = the receiving process's CPU "
    "seconds, start to exit (wait4); CPU w/o start = CPU s less what it had used before the "
    "first byte (it was listening and idle then); +sender = CPU s plus the "
    "sender's CPU while it sent (this process). All per 1e9 data bytes, medians of the runs; "
    "the ratio rows divide by the first row's medians."
)
