"""The receiving daemon's signals: which stop the migration, which report, and
handlers that stay in place until the process exits.

Every signal whose default action would end the process stops the migration as
SIGTERM does (:data:`STOPPING_SIGNALS`); SIGUSR1 reports. Once the outcome is
decided, every one of them is ignored until the process exits: a completed
migration exits 0 whatever arrives after its commit.

The handlers are Python's (``signal.signal``), not the event loop's
``add_signal_handler``: removing the loop's handler resets the signal to its
default action, which ends the process, so a signal arriving just after the
outputs were committed would have turned a success into exit 128+N. Here each
handler is replaced by ``SIG_IGN`` in one ``sigaction``, with no moment between.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import socket
from typing import TYPE_CHECKING

from ..ops import notify

if TYPE_CHECKING:
    from ..daemon.session import Session


def _existing(*names: str) -> set[int]:
    return {getattr(signal, name) for name in names if hasattr(signal, name)}


#: Signals left at their disposition, with why.
LEFT_ALONE = frozenset(
    _existing("SIGKILL", "SIGSTOP")  # cannot be caught
    # their default action ignores, stops or continues the process
    | _existing("SIGCHLD", "SIGURG", "SIGWINCH", "SIGCONT", "SIGTSTP", "SIGTTIN", "SIGTTOU")
    # Python ignores them from start-up: the write that raised one fails with
    # EPIPE or EFBIG instead, and that error names the output
    | _existing("SIGPIPE", "SIGXFSZ")
    # synchronous faults of the process itself: handling them would only hide them
    | _existing("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGTRAP", "SIGSYS")
)
#: Signals that report: SIGUSR1 logs a status_report line.
REPORTING_SIGNALS: tuple[int, ...] = (signal.SIGUSR1,)
#: Signals that stop the migration as SIGTERM does (cancelled, cleaned up, exit
#: 128+N): every other one the system has, real-time signals included.
STOPPING_SIGNALS: tuple[int, ...] = tuple(
    sorted(set(signal.valid_signals()) - LEFT_ALONE - set(REPORTING_SIGNALS))
)


def signal_name(signum: int) -> str:
    """``SIGTERM``; a real-time signal without a name of its own as ``SIGRTMIN+3``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"


class DaemonSignals:
    """While the outcome is open, a stopping signal cancels ``session`` and a
    reporting one logs its status; :meth:`ignore_until_exit` ends that for good.

    Python runs a signal's handler in the main thread once it runs Python code
    again. The loop may be asleep in its selector, and the signal delivered to
    another thread: the signal's byte, written to a socket the loop watches
    (``signal.set_wakeup_fd``), wakes it. The handlers only schedule the work
    on the loop (``call_soon_threadsafe``): they interrupt whatever the loop was
    running, which must not be re-entered.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, session: Session) -> None:
        self._loop = loop
        self._session = session
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._previous_wakeup_fd = -1

    def install(self) -> None:
        """Take every stopping and reporting signal (main thread, loop running)."""
        read_end, write_end = socket.socketpair()
        read_end.setblocking(False)
        write_end.setblocking(False)
        self._wakeup = (read_end, write_end)
        self._loop.add_reader(read_end, _drain, read_end)
        self._previous_wakeup_fd = signal.set_wakeup_fd(
            write_end.fileno(), warn_on_full_buffer=False
        )
        for signum in STOPPING_SIGNALS:
            signal.signal(signum, self._stop)
        for signum in REPORTING_SIGNALS:
            signal.signal(signum, self._report)

    def ignore_until_exit(self) -> None:
        """The outcome is decided: every signal taken is ignored from now on, and
        stays ignored after the loop closes, while the summary is printed, at exit."""
        for signum in (*STOPPING_SIGNALS, *REPORTING_SIGNALS):
            signal.signal(signum, signal.SIG_IGN)
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            read_end, write_end = self._wakeup
            self._loop.remove_reader(read_end)
            read_end.close()
            write_end.close()
            self._wakeup = None

    def _stop(self, signum: int, frame: object) -> None:
        cancel = functools.partial(
            self._session.cancel, f"cancelled by {signal_name(signum)}", signal_number=signum
        )
        self._loop.call_soon_threadsafe(cancel)

    def _report(self, signum: int, frame: object) -> None:
        self._loop.call_soon_threadsafe(notify.log_status, self._session, signal_name(signum))


def _drain(read_end: socket.socket) -> None:
    """Empty the wakeup socket; the handlers themselves run as this Python code does."""
    try:
        while read_end.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass
