"""A migration's outputs, together: opened before listening, made final all at once, or discarded.

Each device's loader owns its data and config :class:`~.output.Output` and the
writer thread they are written on; this module does what concerns them all.
Nothing reaches a final path unless every device is complete (PROTOCOL.md
3.6): :meth:`OutputSet.commit` checks every target before renaming any, keeps
each old file aside until every rename succeeded, and puts them all back if
one fails. A failed or cancelled migration only ever removes temporary files.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ..errors import DeviceIOError, MultifdError, Reason, SessionError, UsageError
from .loader import DeviceLoader
from .output import Output

if TYPE_CHECKING:
    from .ram_sink import RamSink

log = structlog.get_logger("vfio_multifd.commit")

#: How long an aborting migration waits for a writer thread's last write.
ABANDON_WRITER_AFTER = 0.5
#: Outputs not open after this long are waiting for a FIFO's reader: log it.
FIFO_NOTICE_AFTER = 0.1


class OutputSet:
    def __init__(self, loaders: Sequence[DeviceLoader], ram: RamSink | None = None) -> None:
        self.loaders = loaders
        self.ram = ram  # QEMU's main stream and RAM images (--main-stream, --ram)
        self.committing = False  # from here on the outputs are the migration's result
        # True if a writer thread was stuck (a FIFO nobody reads) and left behind:
        # the process must then exit without waiting for it.
        self.abandoned_writers = False

    @property
    def outputs(self) -> list[Output]:
        outputs = [output for loader in self.loaders for output in loader.outputs]
        if self.ram is not None:
            outputs += self.ram.outputs
        return outputs

    async def open(
        self, failed: asyncio.Future[MultifdError], timeout: float | None = None
    ) -> None:
        """Open every output. A FIFO waits for its reader (a ``fifo_waiting_for_reader``
        line says so), but ``failed`` still stops it, and so does ``timeout`` (seconds,
        ``--accept-timeout``: a reader that never comes fails the migration)."""
        opening: asyncio.Future[list[None]] = asyncio.gather(
            *(loader.open() for loader in self.loaders)
        )
        opening.add_done_callback(_consume_exception)
        waiters: list[asyncio.Future[Any]] = [opening, failed]
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        first = FIFO_NOTICE_AFTER if timeout is None else min(FIFO_NOTICE_AFTER, timeout)
        await asyncio.wait(waiters, timeout=first, return_when=asyncio.FIRST_COMPLETED)
        if not opening.done() and not failed.done():
            fifos = [str(o.path) for o in self.outputs if o.waiting_for_reader]
            log.info("fifo_waiting_for_reader", paths=fifos, timeout=timeout)
            left = None if deadline is None else max(0.0, deadline - loop.time())
            await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if not opening.done():
            fifos = [str(o.path) for o in self.outputs if o.waiting_for_reader]
            for loader in self.loaders:
                loader.stop()
            with contextlib.suppress(MultifdError):
                await opening
            if failed.done():
                raise failed.result()
            raise SessionError(
                Reason.ACCEPT_TIMEOUT,
                f"no reader opened {', '.join(fifos) or 'the outputs'} within "
                f"{timeout:g} s (--accept-timeout)",
            )
        try:
            opening.result()
        except DeviceIOError as error:
            raise UsageError(str(error)) from error

    def commit(self) -> None:
        """On a worker thread: rename every output into place, all or none (:func:`commit_all`)."""
        if self.ram is not None:
            self.ram.finish()
        commit_all(self.outputs)

    async def discard(self) -> None:
        """Stop every writer and remove every temporary file.

        A writer thread may be in the middle of a write: let it finish, then
        remove its files. A write that does not finish (a FIFO nobody reads)
        is abandoned, not awaited.
        """
        loop = asyncio.get_running_loop()
        if self.ram is not None:
            ram = self.ram
            ram_discard = loop.run_in_executor(ram.executor, ram.discard)
            _, stuck_ram = await asyncio.wait([ram_discard], timeout=ABANDON_WRITER_AFTER)
            if stuck_ram:
                self.abandoned_writers = True
                log.warning("writer_abandoned", device="RAM")
        discarding: dict[asyncio.Future[None], DeviceLoader] = {}
        for loader in self.loaders:
            loader.stop()
            discarding[loop.run_in_executor(loader.executor, loader.discard)] = loader
        if not discarding:
            return
        # All at once: however many devices, the wait is at most ABANDON_WRITER_AFTER.
        _, stuck = await asyncio.wait(discarding, timeout=ABANDON_WRITER_AFTER)
        for future in stuck:
            self.abandoned_writers = True
            log.warning("writer_abandoned", device=str(discarding[future].key))

    def close(self) -> None:
        """Stop the writer threads; unless committing, no temporary file stays (never raises)."""
        if self.ram is not None and not self.abandoned_writers:
            self.ram.close(committed=self.committing)
        for loader in self.loaders:
            loader.close(wait=not self.abandoned_writers)
            if not self.committing:
                # Even if the discard itself was cancelled: no .part file stays.
                loader.discard_quietly()
            for output in loader.outputs:
                output.unlock()


def commit_all(outputs: Sequence[Output]) -> None:
    """Rename every output into place, all or none (blocking: call it on a worker thread).

    Every target is checked first. Then each output's old file (if any) is
    kept aside under a backup name (a hard link, so the rename over the
    final path stays atomic) and the output renamed into place. If any step
    fails (the disk, a bind mount's EBUSY, a race), every output already
    renamed goes back to its temporary path and every old file back to its
    final path, and the error is raised: the final paths are as they were.
    The backups are removed once every rename succeeded.
    """
    outputs = [output for output in outputs if output.temp_path is not None]
    for output in outputs:
        output.check_target()
    done: list[Output] = []  # renamed into place, in order
    try:
        for output in outputs:
            output.keep_old()
            output.commit()
            done.append(output)
    except DeviceIOError as error:
        undone = [output for output in outputs if output.restore_old()]
        failed = [str(o.path) for o in outputs if o.backup_path is not None]
        if failed:  # could not put everything back: say exactly what
            error.message += f"; old files left at their backup names for: {', '.join(failed)}"
        elif undone:
            error.message += "; every final path is as it was"
        raise
    synced: set[Path] = set()
    for output in done:
        if output.path.parent not in synced:
            synced.add(output.path.parent)
            output.sync_directory()
    for output in done:
        output.drop_old()


def _consume_exception(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: the error that counts is reported elsewhere."""
    if not future.cancelled():
        future.exception()
