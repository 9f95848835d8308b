"""RAM images: one sparse file per RAMBlock, final only when the whole migration is.

In the ``--ram`` directory, the file of a RAMBlock is named by the block's name
with ``%`` and ``/`` percent-encoded (``pc.ram``, ``%2From@etc%2Facpi%2Ftables``)
and byte i of the file is byte i of the block. Files are sized from the main
stream's block list and start as holes: a zero page is only written (zeros,
or its fill byte) over a page that had data, so a guest's untouched memory
costs no disk. The names come from the wire and are refused when they could
not be one file of that directory: empty, ``.``, ``..``, a NUL byte, longer
than a file name may be once encoded, or equal to another block's name once
encoded and case-folded (they would be one file on a case-insensitive
filesystem).

Space: the block list's total (the files' apparent size, every page with
data in the worst case) must fit the filesystem's free space for the
daemon's user (``statvfs`` ``f_bavail``) when the files are created, unless
``check_space=False``: a source announcing terabytes fails at once, by name,
instead of filling the disk. Zero pages make the real use smaller; a write
that still finds the disk full fails the migration with its errno.

Files are created as device outputs are (:class:`~vfio_multifd.daemon.output.Output`:
a ``.part`` file beside the target, mode and owner of a file replaced kept)
and put in place all or none with the migration's other outputs
(:func:`~vfio_multifd.daemon.commit.commit_all`). The methods block: call them on a
writer thread.
"""

from __future__ import annotations

import errno as errno_module
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..core.savevm import DEFAULT_PAGE_SIZE, RamBlock
from ..errors import DeviceIOError, ProtocolError, Reason, SessionError, os_error_text
from ..safe_files import open_private_directory
from .commit import commit_all
from .output import Output

#: Longest file name most filesystems take (NAME_MAX), in bytes.
NAME_MAX = 255


def image_name(block: str) -> str:
    """The file name of a RAMBlock's image; raises ProtocolError for a name that cannot be one."""
    if block in ("", ".", "..") or "\0" in block:
        raise ProtocolError(
            Reason.RAM_BLOCK, f"RAMBlock name {block!r} cannot name a file of the --ram directory"
        )
    name = block.replace("%", "%25").replace("/", "%2F")
    if len(os.fsencode(name)) > NAME_MAX:
        raise ProtocolError(
            Reason.RAM_BLOCK,
            f"RAMBlock name {block!r} is {len(os.fsencode(name))} bytes once encoded; a file "
            f"name takes at most {NAME_MAX}",
        )
    return name


def image_names(blocks: Iterable[RamBlock]) -> dict[str, str]:
    """Each block's file name; refuses names that would be one file."""
    names: dict[str, str] = {}
    folded: dict[str, str] = {}
    for block in blocks:
        name = image_name(block.name)
        other = folded.get(name.casefold())
        if other is not None:
            raise ProtocolError(
                Reason.RAM_BLOCK,
                f"RAMBlocks {other!r} and {block.name!r} would be one file ({name}) on a "
                "case-insensitive filesystem",
            )
        folded[name.casefold()] = block.name
        names[block.name] = name
    return names


class _Image:
    __slots__ = ("block", "has_data", "output")

    def __init__(self, block: RamBlock, output: Output, pages: int) -> None:
        self.block = block
        self.output = output
        self.has_data = bytearray((pages + 7) // 8)  # one bit per page: not a hole any more


class RamImages:
    """The RAM images of one migration, created from its block list."""

    def __init__(
        self,
        directory: Path,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        fsync: bool = True,
        check_space: bool = True,
    ) -> None:
        self.directory = directory
        self.page_size = page_size
        self.fsync = fsync
        self.check_space = check_space
        self._images: dict[str, _Image] = {}
        self.pages_written = 0
        self.zero_pages = 0
        self.zero_pages_written = 0  # zero pages that landed on a page that had data

    @property
    def outputs(self) -> list[Output]:
        return [image.output for image in self._images.values()]

    def create(self, blocks: Sequence[RamBlock]) -> None:
        """Check the names and the space, then create every image (sized, all holes)."""
        if self._images:
            raise RuntimeError("the RAM images exist already")
        names = image_names(blocks)
        directory_fd = open_private_directory(self.directory, f"--ram directory {self.directory}")
        try:
            if self.check_space:
                self._check_space(directory_fd, blocks)
        finally:
            os.close(directory_fd)
        try:
            for block in blocks:
                output = Output(
                    self.directory / names[block.name],
                    device=f"RAMBlock {block.name}",
                    what="RAM image",
                    fsync=self.fsync,
                )
                output.open()
                pages = block.used_length // self.page_size
                self._images[block.name] = _Image(block, output, pages)
                fd = output.fd
                assert fd is not None
                try:
                    os.ftruncate(fd, block.used_length)
                except OSError as error:
                    raise self._error(block.name, "cannot size", error) from error
        except BaseException:
            self.discard()
            raise

    def _check_space(self, directory_fd: int, blocks: Sequence[RamBlock]) -> None:
        total = sum(block.used_length for block in blocks)
        info = os.fstatvfs(directory_fd)
        free = info.f_bavail * info.f_frsize
        if total > free:
            raise SessionError(
                Reason.RAM_NO_SPACE,
                f"the source's {len(blocks)} RAMBlocks total {total} bytes "
                f"({total / 2**30:.1f} GiB) and {self.directory} has {free} bytes free: "
                "every page could have data",
            )

    def _image(self, block: str, offset: int) -> _Image:
        image = self._images.get(block)
        if image is None:
            raise ProtocolError(Reason.RAM_BLOCK, f"RAMBlock {block!r} has no image")
        if offset % self.page_size or offset + self.page_size > image.block.used_length:
            raise ProtocolError(
                Reason.RAM_OFFSET,
                f"page offset {offset:#x} of RAMBlock {block} is not a page within its used "
                f"length {image.block.used_length:#x}",
            )
        return image

    def write_page(self, block: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        if len(data) != self.page_size:
            raise ValueError(f"a page is {self.page_size} bytes, not {len(data)}")
        image = self._image(block, offset)
        self._pwrite(image, data, offset)
        page = offset // self.page_size
        image.has_data[page >> 3] |= 1 << (page & 7)
        self.pages_written += 1

    def zero_page(self, block: str, offset: int, fill: int = 0) -> None:
        """A page whose every byte is ``fill``: a hole stays a hole."""
        image = self._image(block, offset)
        page = offset // self.page_size
        mask = 1 << (page & 7)
        self.zero_pages += 1
        if fill:
            self._pwrite(image, bytes([fill]) * self.page_size, offset)
            image.has_data[page >> 3] |= mask
        elif image.has_data[page >> 3] & mask:
            self._pwrite(image, bytes(self.page_size), offset)
            image.has_data[page >> 3] &= ~mask
            self.zero_pages_written += 1

    def _pwrite(self, image: _Image, data: bytes | bytearray | memoryview, offset: int) -> None:
        fd = image.output.fd
        assert fd is not None, "the RAM images are not open"
        view = memoryview(data).cast("B")
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                if written <= 0:
                    raise OSError(errno_module.EIO, f"pwrite returned {written}")
                view, offset = view[written:], offset + written
        except OSError as error:
            raise self._error(image.block.name, "cannot write", error) from error

    def finish(self) -> None:
        """Make every image durable (before the commit makes them visible)."""
        for image in self._images.values():
            image.output.finish()

    def commit(self) -> None:
        """Alone (no other outputs): every image into place, all or none; the paths'
        locks are let go either way (the run is over)."""
        try:
            commit_all(self.outputs)
        finally:
            self._unlock()

    def discard(self) -> None:
        """Remove every temporary file; the final paths stay as they were. Never raises."""
        for image in self._images.values():
            image.output.discard()
        self._unlock()

    def _unlock(self) -> None:
        for image in self._images.values():
            image.output.unlock()

    def _error(self, block: str, doing: str, error: OSError) -> DeviceIOError:
        path = self._images[block].output.path if block in self._images else self.directory
        return DeviceIOError(
            f"{doing} RAM image {path}: {os_error_text(error)}",
            device=f"RAMBlock {block}",
            errno=error.errno,
        )
