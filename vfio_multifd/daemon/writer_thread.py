"""A device's writer thread: its jobs run one at a time, in the order given, off the loop.

:class:`WriterThread` is an :class:`~concurrent.futures.Executor` of one
thread (``loop.run_in_executor`` takes it, for the jobs the loop awaits: opening,
pre-copy data, the config state, a discard) with a second, lighter way in for
the hot path, :meth:`WriterThread.post`: a batch of chunks with a plain
callback, no future on either side. A batch is queued without waking the
thread when it is busy (it takes the next job as it finishes one), and what it
wrote is told back to the loop in one call for every batch written since the
loop last heard from it: one wake-up of the loop, not one per batch.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: What the thread runs: ``run(item)``, then, if ``done`` is given, ``done(item, error)``
#: on the loop.
_Job = tuple[Callable[[Any], None], Any, Callable[[Any, BaseException | None], None] | None]


class WriterThread(concurrent.futures.Executor):
    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()  # wakes it only if idle
        self._thread: threading.Thread | None = None  # started with the first job
        self._loop: asyncio.AbstractEventLoop | None = None  # where posted jobs report
        self._written: collections.deque[tuple[Callable[[Any, Any], None], Any, Any]] = (
            collections.deque()
        )
        self._report_due = False  # a report is scheduled on the loop and has not begun
        self._shut = False

    def submit(  # type: ignore[override]
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._put((_run_submitted, (fn, args, kwargs, future), None))
        return future

    def post(
        self,
        run: Callable[[T], None],
        item: T,
        done: Callable[[T, BaseException | None], None],
    ) -> None:
        """Queue ``run(item)``; ``done(item, error)`` is called on the loop once it ran
        (``error``: what it raised, if anything). From the loop's thread only."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._put((run, item, done))

    def _put(self, job: _Job) -> None:
        if self._shut:
            raise RuntimeError(f"cannot queue a job: {self.name} is shut down")
        if self._thread is None:
            # A daemon: a write that never returns (a FIFO nobody reads, abandoned by the
            # session) must not keep the process from exiting.
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            run, item, done = job
            error: BaseException | None = None
            try:
                run(item)
            except BaseException as raised:  # told to the loop, which decides
                error = raised
            if done is None:
                continue
            self._written.append((done, item, error))
            if not self._report_due:
                self._report_due = True
                assert self._loop is not None
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                    self._loop.call_soon_threadsafe(self._report)

    def _report(self) -> None:
        """On the loop: every posted job done since the last report, in order."""
        self._report_due = False  # before taking them: a job done from now on schedules anew
        written = self._written
        while written:
            done, item, error = written.popleft()
            try:
                done(item, error)
            except Exception as raised:  # a bug in one callback must not strand the others
                assert self._loop is not None
                self._loop.call_exception_handler(
                    {"message": f"{self.name}: a written job's callback failed", "exception": raised}
                )

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more jobs; ``cancel_futures``: drop the queued ones (futures cancelled,
        posted jobs never reported); ``wait``: until the thread has finished."""
        self._shut = True
        if cancel_futures:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job[0] is _run_submitted:
                    job[1][3].cancel()
        self._jobs.put(None)
        if wait and self._thread is not None:
            self._thread.join()


def _run_submitted(
    job: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], concurrent.futures.Future[Any]],
) -> None:
    """A job of :meth:`WriterThread.submit`: its outcome goes to its future."""
    fn, args, kwargs, future = job
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as error:
        future.set_exception(error)
    else:
        future.set_result(result)
