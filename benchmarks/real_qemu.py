"""A real QEMU as the source: its migration to the daemon, against a raw capture, same run.

    python benchmarks/real_qemu.py [--reps 5] [--cases 7.2,10.0,...]
        [--checkout DIR] [--json PATH] [--tmpdir DIR]

QEMU migrates a 64 MiB VM (``tests/qemu/harness.py``: paused before it ever
ran, a 256 KiB blob among zeros) with multifd over 2 channels, in turn to two
destinations, ``--reps`` times each, the order alternating, a fresh VM each time:

* the *capture*, ``tests/qemu/capture.py``'s receiver, threads in this process
  that store each connection's bytes in a file and parse nothing: the
  strongest naive destination;
* the *daemon*, ``vfio-multifd receive --main-stream FILE --ram DIR --result
  PATH`` with its defaults (its outputs fsynced before they are put in place),
  sent its first byte once it is idle, as a destination is before a migration.

Cases: ``7.2`` and ``10.0``, one per QEMU found (a QEMU that is not there
skips its cases with one line saying so); ``10.0-legacy``,
``zero-page-detection=legacy`` (zero pages on the main channel, as 7.2 sends
them); ``7.2-running`` and ``10.0-running``, a guest rewriting 4 MiB and the
migration held until 4 bitmap syncs, QEMU's bandwidth capped at 16 MiB/s for
its first pass (its pacing, more than the destination, sets their times).

Per run: QEMU's ``total-time`` (``query-migrate``), the wall time from
``migrate`` to the destination having everything (the capture: every
connection closed; the daemon: its exit), the bytes received, and the daemon's
``duration_s`` (its ``--result``) and CPU (user + system, start to exit,
``wait4``). A daemon run counts only if it exited 0 and its ``pc.ram`` equals
the source's RAM read afterwards (``pmemsave``, less the VGA/ROM window); a
capture run only if every connection came and one of them is the main
channel. ``--checkout DIR`` runs another checkout's ``vfio_multifd`` as the
daemon (with its ``.venv/bin/python`` if it has one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon import Listening, run_receiver
from replay import Replay
from report import comma_list, format_table, median_range, progress, run_status
from workload import Workload

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the real-QEMU harness lives with the tests

from qemu.capture import CaptureReceiver, classify  # noqa: E402
from qemu.harness import (  # noqa: E402
    Qemu,
    QemuError,
    SourceVm,
    find_qemus,
    make_blob,
    mask_pc_window,
    source_vm,
)

CHANNELS = 2
BLOB = make_blob(256 << 10)
#: A migration, and a destination's end after QEMU's, each within this many seconds.
TIMEOUT = 120.0
KINDS = ("capture", "daemon")


@dataclass(frozen=True)
class Case:
    name: str
    qemu: str  # "7.2" / "10.0"
    running: bool = False
    zero_page_detection: str | None = None

    @property
    def label(self) -> str:
        guest = "running, 4 syncs" if self.running else "paused"
        zero = f", zero pages {self.zero_page_detection}" if self.zero_page_detection else ""
        return f"QEMU {self.qemu}, {guest}{zero}"


CASES = {
    case.name: case
    for case in (
        Case("7.2", "7.2"),
        Case("10.0", "10.0"),
        Case("10.0-legacy", "10.0", zero_page_detection="legacy"),
        Case("7.2-running", "7.2", running=True),
        Case("10.0-running", "10.0", running=True),
    )
}


@dataclass
class Run:
    kind: str  # "capture" / "daemon"
    ok: bool
    error: str = ""
    total_time: float = 0.0  # s, QEMU's total-time
    wall: float = 0.0  # s, migrate -> the destination has everything
    received: int = 0  # bytes, every connection
    duration: float = 0.0  # s, the daemon's duration_s
    cpu: float = 0.0  # s, the daemon's user + system, start to exit
    startup_cpu: float = 0.0  # s, of which before QEMU's first byte (interpreter, imports)


@dataclass
class Result:
    case: Case
    runs: dict[str, list[Run]] = field(default_factory=lambda: {kind: [] for kind in KINDS})

    def ok(self, kind: str) -> list[Run]:
        return [run for run in self.runs[kind] if run.ok]

    def ratios(self, figure: str) -> list[float]:
        """Daemon / capture of ``figure`` in each pair where both counted."""
        pairs = zip(self.runs["capture"], self.runs["daemon"], strict=False)
        return [
            getattr(d, figure) / getattr(c, figure)
            for c, d in pairs
            if c.ok and d.ok and getattr(c, figure) > 0
        ]


# --- one run each -------------------------------------------------------------------------


@contextlib.contextmanager
def prepared_vm(qemu: Qemu, case: Case, work: Path) -> Iterator[SourceVm]:
    """A fresh source VM with multifd set, its guest (if running) seen rewriting its pages."""
    with source_vm(qemu, work / "vm", blob=BLOB, running=case.running) as vm:
        vm.set_multifd(CHANNELS, zero_page_detection=case.zero_page_detection)
        if case.running:
            vm.wait_guest_looping()  # before the clock: migrate() would wait for it
        yield vm


def migrate(vm: SourceVm, port: int, case: Case) -> dict[str, Any]:
    """Migrate to ``port``; QEMU's last ``query-migrate`` answer, which must say completed."""
    vm.migrate(port, rounds=4 if case.running else 0)
    info = vm.wait_migration(TIMEOUT)
    if info.get("status") != "completed":
        raise QemuError(f"QEMU's migration ended {info.get('status')}: {info}")
    return info


def run_capture(qemu: Qemu, case: Case, work: Path) -> Run:
    with prepared_vm(qemu, case, work) as vm:
        receiver = CaptureReceiver(work / "capture", CHANNELS + 1)
        closed: list[float] = []
        paths: list[Path] = []
        failures: list[BaseException] = []

        def wait_closed() -> None:
            try:
                paths.extend(receiver.wait(2 * TIMEOUT))
            except (OSError, TimeoutError) as error:
                failures.append(error)
            closed.append(time.monotonic())

        waiter = threading.Thread(target=wait_closed, daemon=True)
        waiter.start()
        started = time.monotonic()
        try:
            info = migrate(vm, receiver.port, case)
        except QemuError as error:
            receiver.close()
            return Run("capture", ok=False, error=str(error))
        waiter.join(TIMEOUT)
    if not closed or failures:
        return Run("capture", ok=False, error=str(failures[0]) if failures else "still open")
    try:
        classify(paths)
    except ValueError as error:
        return Run("capture", ok=False, error=str(error))
    return Run(
        "capture",
        ok=True,
        total_time=info["total-time"] / 1e3,
        wall=closed[0] - started,
        received=sum(path.stat().st_size for path in paths),
    )


def daemon_command(checkout: Path, work: Path) -> list[str]:
    """``receive`` for a real QEMU, run from ``checkout`` with its own package first on the path."""
    venv = checkout / ".venv/bin/python"
    python = str(venv) if venv.exists() else sys.executable
    return [
        "env", "-C", str(checkout), f"PYTHONPATH={checkout}",
        python, "-m", "vfio_multifd", "receive", "--listen", "tcp:127.0.0.1:0",
        "--log-format", "json", "--channels", str(CHANNELS),
        "--main-stream", str(work / "main.bin"), "--ram", str(work / "ram"),
        "--result", str(work / "result.json"),
    ]  # fmt: skip


def run_the_daemon(qemu: Qemu, case: Case, work: Path, checkout: Path) -> Run:
    (work / "ram").mkdir()
    timed: dict[str, Any] = {}

    def send(receiver: Listening, _workload: Workload, timeout: float) -> Replay:
        """QEMU migrates to the daemon; returns once the daemon has exited."""
        exited: list[float] = []

        def wait_exit() -> None:
            os.waitid(os.P_PID, receiver.pid, os.WEXITED | os.WNOWAIT)  # reaped by run_receiver
            exited.append(time.monotonic())

        waiter = threading.Thread(target=wait_exit, daemon=True)
        waiter.start()
        started, wall_started = time.monotonic(), time.time()
        try:
            timed["info"] = migrate(vm, receiver.address.port, case)
        except QemuError as error:
            raise RuntimeError(str(error)) from None
        done = time.time()
        waiter.join(TIMEOUT)
        if not exited:
            raise RuntimeError(f"the daemon had not exited {TIMEOUT:.0f} s after QEMU completed")
        timed["wall"] = exited[0] - started
        return Replay(wall_started, done, [])

    with prepared_vm(qemu, case, work) as vm:
        command = daemon_command(checkout, work)
        finished = run_receiver(command, Workload([]), 2 * TIMEOUT, send, settle=True)
        if finished.error:
            return Run("daemon", ok=False, error=finished.error, cpu=finished.cpu)
        memory = mask_pc_window(vm.read_ram())
    result = json.loads((work / "result.json").read_text())
    if mask_pc_window((work / "ram" / "pc.ram").read_bytes()) != memory:
        return Run("daemon", ok=False, error="its pc.ram differs from the source's RAM")
    return Run(
        "daemon",
        ok=True,
        total_time=timed["info"]["total-time"] / 1e3,
        wall=timed["wall"],
        received=result["main_stream_bytes"] + sum(c["bytes"] for c in result["channels"]),
        duration=result["duration_s"],
        cpu=finished.cpu,
        startup_cpu=finished.counts.startup,
    )


def run_case(result: Result, qemu: Qemu, *, reps: int, base_dir: Path, checkout: Path) -> None:
    """``reps`` pairs, the order alternating, each run in a directory removed after it."""
    case = result.case
    for rep in range(reps):
        for kind in KINDS if rep % 2 == 0 else KINDS[::-1]:
            work = Path(tempfile.mkdtemp(prefix="vfio-multifd-real-qemu-", dir=base_dir))
            try:
                if kind == "capture":
                    run = run_capture(qemu, case, work)
                else:
                    run = run_the_daemon(qemu, case, work, checkout)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            result.runs[kind].append(run)
            figures = f"QEMU {run.total_time * 1e3:6.0f} ms, wall {run.wall * 1e3:6.0f} ms"
            if kind == "daemon":
                figures += f", duration_s {run.duration:.3f}, CPU {run.cpu:.2f} s"
            status = run_status(run.ok, figures, run.error)
            progress(f"real_qemu {case.name} rep {rep + 1}/{reps} {kind:7} {status}")


# --- the report --------------------------------------------------------------------------


def format_report(results: Sequence[Result]) -> list[str]:
    header = (
        "case", "destination", "QEMU total ms", "wall ms", "daemon s", "CPU s", "start-up CPU s",
        "KiB", "ok",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = []
    for result in results:
        label = result.case.label
        for kind in KINDS:
            runs = result.ok(kind)
            daemon = kind == "daemon"
            rows.append(
                (
                    label,
                    kind,
                    median_range([r.total_time for r in runs], ".0f", 1e3),
                    median_range([r.wall for r in runs], ".0f", 1e3),
                    median_range([r.duration for r in runs], ".3f") if daemon else "",
                    median_range([r.cpu for r in runs], ".2f") if daemon else "",
                    median_range([r.startup_cpu for r in runs], ".2f") if daemon else "",
                    median_range([r.received for r in runs], ".0f", 1 / 1024),
                    f"{len(runs)}/{len(result.runs[kind])}",
                )
            )
        rows.append(
            (
                label,
                "daemon/capture",
                median_range(result.ratios("total_time"), ".2f"),
                median_range(result.ratios("wall"), ".2f"),
                *("",) * 5,
            )
        )
    return format_table(header, rows, left=2)


LEGEND = (
    "Medians [ranges] over the runs that counted. QEMU total ms = query-migrate's "
    "total-time; wall ms = migrate to the destination having everything (capture: every "
    "connection closed; daemon: its exit); daemon s = its --result duration_s; CPU s = the "
    "daemon process's user + system, start to exit, of which start-up CPU s before QEMU's "
    "first byte (interpreter, imports, warming its buffers); KiB = bytes received over "
    "every connection; daemon/capture = the ratio in each pair."
)


def missing_qemus(cases: Sequence[Case], found: dict[str, Qemu]) -> list[str]:
    """One line per QEMU that the cases need and that is not there."""
    wanted = dict.fromkeys(case.qemu for case in cases)  # in the cases' order
    return [
        f"real_qemu: no QEMU {label} (make qemu, or set QEMU_{label.replace('.', '_')}): "
        f"its cases skipped"
        for label in wanted
        if label not in found
    ]


#: Run by the daemon's interpreter: where its package is, compiled there (as an installed
#: package is): without bytecode every daemon would compile its modules again, 0.1-0.2 s
#: of CPU, wherever PYTHONDONTWRITEBYTECODE is set.
PREPARE = (
    "import compileall, pathlib, vfio_multifd; "
    "path = pathlib.Path(vfio_multifd.__file__).parent; "
    "assert compileall.compile_dir(path, quiet=1), 'compileall failed'; print(path)"
)


def prepare_code(checkout: Path) -> str:
    """Where the daemon's package is imported from, compiled, asked of the daemon's interpreter."""
    command = daemon_command(checkout, checkout)[:5]  # env -C DIR PYTHONPATH=DIR python
    command += ["-c", PREPARE]
    answer = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    return answer.stdout.strip() or f"(cannot import vfio_multifd: {answer.stderr.strip()})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/real_qemu.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--reps", type=int, default=5, help="pairs per case (default 5)")
    parser.add_argument(
        "--cases", type=comma_list(tuple(CASES)), default=list(CASES), help=", ".join(CASES)
    )
    parser.add_argument(
        "--checkout", type=Path, default=ROOT, help="whose vfio_multifd runs (default this one)"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also dump raw results")
    parser.add_argument("--tmpdir", default=None, help="where the runs write (default $TMPDIR)")
    args = parser.parse_args(argv)
    cases = [CASES[name] for name in args.cases]
    found = find_qemus()
    for line in missing_qemus(cases, found):
        progress(line)
    cases = [case for case in cases if case.qemu in found]
    if not cases:
        return 0
    checkout = args.checkout.resolve()
    code = prepare_code(checkout)
    started = time.monotonic()
    progress(
        f"real_qemu: cases {[c.name for c in cases]}, 64 MiB VM over {CHANNELS} channels, "
        f"{args.reps} pair(s) each; the daemon's code: {code}"
    )
    base_dir = Path(args.tmpdir or tempfile.gettempdir())
    results = []
    for case in cases:
        result = Result(case)
        run_case(result, found[case.qemu], reps=args.reps, base_dir=base_dir, checkout=checkout)
        results.append(result)
    versions = ", ".join(f"{found[label].label} {found[label].package}".strip()
                         for label in dict.fromkeys(c.qemu for c in cases))  # fmt: skip
    print(f"A real QEMU source ({versions}): 64 MiB VM, {CHANNELS} multifd channels, "
          f"capture against the daemon ({code})")  # fmt: skip
    for line in format_report(results):
        print(line)
    print()
    print(textwrap.fill(LEGEND, 100))
    print(f"took {time.monotonic() - started:.0f} s")
    if args.json:
        raw = {"reps": args.reps, "code": code, "results": [asdict(r) for r in results]}
        Path(args.json).write_text(json.dumps(raw, indent=1))
    runs = [run for result in results for kind in result.runs.values() for run in kind]
    return 1 if any(not run.ok for run in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
