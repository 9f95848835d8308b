"""The device's writer thread: one job at a time in the order given, batches told back together."""

from __future__ import annotations

import asyncio
import threading

import pytest
from helpers import until

from vfio_multifd.daemon.writer_thread import WriterThread

WAIT = 5.0  # a bound on every wait here; each passes in milliseconds


async def test_jobs_run_in_the_order_given_whichever_way_they_came() -> None:
    writer = WriterThread("writer-test")
    loop = asyncio.get_running_loop()
    ran: list[str] = []
    told: list[tuple[str, BaseException | None]] = []
    try:
        opened = loop.run_in_executor(writer, ran.append, "open")
        for name in ("batch 1", "batch 2"):
            writer.post(ran.append, name, lambda item, error: told.append((item, error)))
        last = loop.run_in_executor(writer, ran.append, "config")
        await asyncio.wait_for(asyncio.gather(opened, last), WAIT)
    finally:
        writer.shutdown()
    assert ran == ["open", "batch 1", "batch 2", "config"]
    # Each posted job is told on the loop before a job queued after it completes there.
    assert told == [("batch 1", None), ("batch 2", None)]


async def test_batches_written_while_the_loop_is_busy_are_told_in_one_call() -> None:
    """One wake-up of the loop for every batch written since it last heard."""
    writer = WriterThread("writer-test")
    started, release = threading.Event(), threading.Event()
    on_loop: list[bool] = []
    told: list[int] = []
    reports = 0
    real_report = writer._report

    def counted_report() -> None:
        nonlocal reports
        reports += 1
        real_report()

    writer._report = counted_report  # type: ignore[method-assign]

    def write(n: int) -> None:
        if n == 0:
            started.set()
            assert release.wait(WAIT)

    def done(n: int, error: BaseException | None) -> None:
        assert error is None
        on_loop.append(threading.get_ident() == main)
        told.append(n)

    main = threading.get_ident()
    try:
        for n in range(3):
            writer.post(write, n, done)
        assert started.wait(WAIT)
        release.set()
        # Blocking the loop until the thread is past all three: the loop has not run.
        writer.submit(lambda: None).result(WAIT)
        assert told == []
        await until(lambda: len(told) == 3, "every batch told", WAIT)
    finally:
        writer.shutdown()
    assert told == [0, 1, 2]
    assert on_loop == [True, True, True]
    assert reports == 1


async def test_a_failed_job_is_told_with_its_error_and_the_next_still_runs() -> None:
    writer = WriterThread("writer-test")
    told: list[tuple[int, str | None]] = []
    finished = asyncio.Event()

    def write(n: int) -> None:
        if n == 1:
            raise OSError(28, "No space left on device")

    def done(n: int, error: BaseException | None) -> None:
        told.append((n, None if error is None else str(error)))
        if n == 2:
            finished.set()

    try:
        for n in range(3):
            writer.post(write, n, done)
        await asyncio.wait_for(finished.wait(), WAIT)
    finally:
        writer.shutdown()
    assert told == [(0, None), (1, "[Errno 28] No space left on device"), (2, None)]


async def test_a_callback_that_raises_does_not_strand_the_batches_told_after_it() -> None:
    """The batches of one report are told one by one: a bug in one callback goes to the
    loop's exception handler, and the others are still told (a loader waiting for its
    last batch would otherwise wait for ever)."""
    writer = WriterThread("writer-test")
    loop = asyncio.get_running_loop()
    handled: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: handled.append(context))
    told: list[int] = []
    started, release = threading.Event(), threading.Event()

    def write(n: int) -> None:
        if n == 0:
            started.set()
            assert release.wait(WAIT)

    def done(n: int, error: BaseException | None) -> None:
        told.append(n)
        if n == 0:
            raise RuntimeError("a bug in the first callback")

    try:
        for n in range(3):
            writer.post(write, n, done)
        assert started.wait(WAIT)
        release.set()
        writer.submit(lambda: None).result(WAIT)  # all three written: one report for them
        await until(lambda: len(told) == 3, "every batch told", WAIT)
    finally:
        writer.shutdown()
        loop.set_exception_handler(None)
    assert told == [0, 1, 2]
    assert len(handled) == 1
    assert str(handled[0]["exception"]) == "a bug in the first callback"
    assert "writer-test" in str(handled[0]["message"])


async def test_shutdown_cancels_what_is_queued_and_refuses_more() -> None:
    writer = WriterThread("writer-test")
    loop = asyncio.get_running_loop()
    started, release = threading.Event(), threading.Event()

    def stuck() -> None:
        started.set()
        assert release.wait(WAIT)

    running = loop.run_in_executor(writer, stuck)
    assert started.wait(WAIT)
    queued = loop.run_in_executor(writer, print, "never")
    writer.shutdown(wait=False, cancel_futures=True)
    release.set()
    await asyncio.wait_for(running, WAIT)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(queued, WAIT)
    with pytest.raises(RuntimeError, match="shut down"):
        writer.submit(print, "too late")
    writer.shutdown()  # waits for the thread: it has ended
