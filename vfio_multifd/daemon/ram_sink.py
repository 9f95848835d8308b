"""Where QEMU's RAM pages and main-stream bytes are written: one writer thread, in order.

The core emits :class:`~vfio_multifd.core.commands.WriteRam` in the order the
sync points allow; this sink runs them on a single thread, first in first
out, so pages reach their files in that order (a page of a later round over
its earlier copy). The RAM images (``ram_images.py``, ``--ram DIR``; none for
``--ram discard``) and the main stream's output (``--main-stream PATH``) are
committed with the device outputs, all or none (``commit.py``).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from pathlib import Path

from ..config import ReceiveSettings
from ..core.savevm import RamBlock
from ..errors import DeviceIOError, UsageError
from .output import Output
from .ram_images import RamImages


class RamSink:
    def __init__(self, settings: ReceiveSettings) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ram-writer"
        )
        self.images: RamImages | None = None
        if isinstance(settings.ram, Path):
            self.images = RamImages(settings.ram, fsync=settings.fsync)
        self.main: Output | None = None
        if settings.main_stream is not None:
            self.main = Output(
                settings.main_stream, device="main channel", what="main stream", fsync=settings.fsync
            )

    @property
    def outputs(self) -> list[Output]:
        outputs = [] if self.main is None else [self.main]
        if self.images is not None:
            outputs += self.images.outputs
        return outputs

    def open(self) -> None:
        """Before listening (blocking): the main stream's output."""
        if self.main is not None:
            try:
                self.main.open()
            except DeviceIOError as error:
                raise UsageError(str(error)) from error

    def create(self, blocks: Sequence[RamBlock]) -> None:
        """On the writer thread: the block list came."""
        if self.images is not None:
            self.images.create(blocks)

    def write(self, pages: Sequence[tuple[str, int, memoryview | int]], main: bytes) -> None:
        """On the writer thread: pages (data, or a fill byte), then main-stream bytes."""
        images = self.images
        if images is not None:
            for block, offset, data in pages:
                if isinstance(data, int):
                    images.zero_page(block, offset, data)
                else:
                    images.write_page(block, offset, data)
        if main and self.main is not None:
            self.main.write([main])

    def finish(self) -> None:
        """Every output durable, before the commit (on the commit's thread: no write is left)."""
        if self.main is not None:
            self.main.finish()
        if self.images is not None:
            self.images.finish()

    def discard(self) -> None:
        """Never raises: every temporary file removed."""
        if self.main is not None:
            self.main.discard()
        if self.images is not None:
            self.images.discard()

    def close(self, *, committed: bool) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        if not committed:
            self.discard()
        for output in self.outputs:
            output.unlock()
