"""A migration's outputs, together: opened before listening, made final all at once, or discarded.

Each device's loader owns its data and config :class:`~.output.Output` and the
writer thread they are written on; this module does what concerns them all.
Nothing reaches a final path unless every device is complete (PROTOCOL.md
3.6): :meth:`OutputSet.commit` checks every target before renaming any, and a
failed or cancelled migration only ever removes temporary files.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from .errors import DeviceIOError, MultifdError, UsageError
from .loader import DeviceLoader
from .output import Output

log = structlog.get_logger("vfio_multifd.commit")

#: How long an aborting migration waits for a writer thread's last write.
ABANDON_WRITER_AFTER = 0.5


class OutputSet:
    def __init__(self, loaders: Sequence[DeviceLoader]) -> None:
        self.loaders = loaders
        self.committing = False  # from here on the outputs are the migration's result
        # True if a writer thread was stuck (a FIFO nobody reads) and left behind:
        # the process must then exit without waiting for it.
        self.abandoned_writers = False

    @property
    def outputs(self) -> list[Output]:
        return [output for loader in self.loaders for output in loader.outputs]

    async def open(self, failed: asyncio.Future[MultifdError]) -> None:
        """Open every output; a FIFO waits for its reader, but ``failed`` still stops it."""
        opening: asyncio.Future[list[None]] = asyncio.gather(
            *(loader.open() for loader in self.loaders)
        )
        opening.add_done_callback(_consume_exception)
        waiters: list[asyncio.Future[Any]] = [opening, failed]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not opening.done():
            for loader in self.loaders:
                loader.stop()
            with contextlib.suppress(MultifdError):
                await opening
            raise failed.result()
        try:
            opening.result()
        except DeviceIOError as error:
            raise UsageError(str(error)) from error

    def commit(self) -> None:
        """On a worker thread: rename every output into place, checking all targets first.

        A rename that still fails part-way (the disk, a race) is reported with
        the outputs already in place, so nobody mistakes them for the old ones.
        """
        outputs = self.outputs
        for output in outputs:
            output.check_target()
        renamed: list[Output] = []
        for output in outputs:
            if output.temp_path is None:
                continue  # a device or FIFO, written in place
            try:
                output.commit()
            except DeviceIOError as error:
                if renamed:
                    done = ", ".join(str(o.path) for o in renamed)
                    error.message += f"; already in place from this run: {done}"
                raise
            renamed.append(output)
        synced: set[Path] = set()
        for output in renamed:
            if output.path.parent not in synced:
                synced.add(output.path.parent)
                output.sync_directory()

    async def discard(self) -> None:
        """Stop every writer and remove every temporary file.

        A writer thread may be in the middle of a write: let it finish, then
        remove its files. A write that does not finish (a FIFO nobody reads)
        is abandoned, not awaited.
        """
        loop = asyncio.get_running_loop()
        for loader in self.loaders:
            loader.stop()
            discarding = loop.run_in_executor(loader.executor, loader.discard)
            try:
                await asyncio.wait_for(asyncio.shield(discarding), ABANDON_WRITER_AFTER)
            except TimeoutError:
                self.abandoned_writers = True
                log.warning("writer_abandoned", device=str(loader.device.key))

    def close(self) -> None:
        """Stop the writer threads; unless committing, no temporary file stays (never raises)."""
        for loader in self.loaders:
            loader.close(wait=not self.abandoned_writers)
            if not self.committing:
                # Even if the discard itself was cancelled: no .part file stays.
                loader.discard_quietly()


def _consume_exception(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: the error that counts is reported elsewhere."""
    if not future.cancelled():
        future.exception()
