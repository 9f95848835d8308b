"""The ram section of QEMU's main stream: its records, parsed as the main
stream's parser meets them (``ram.c``; PROTOCOL.md section 7).

Pure: records in through a :class:`Cursor`, events out through ``emit``. The
block list (MEM_SIZE) is checked here, every page against it, and sync points
counted: at each EOS (QEMU 7.2 and its machine types) or at each MULTIFD_FLUSH.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ProtocolError, Reason
from .mainstream_cursor import U8, U64, Cursor
from .savevm import (
    KNOWN_RAM_FLAGS,
    MAX_RAM_BLOCKS,
    REFUSED_RAM_FLAGS,
    BlockList,
    Event,
    Page,
    RamBlock,
    RamFlag,
    SyncPoint,
    ZeroPage,
)

# Plain ints for the per-record path (IntFlag arithmetic costs a microsecond a go).
_ZERO, _PAGE, _CONTINUE = int(RamFlag.ZERO), int(RamFlag.PAGE), int(RamFlag.CONTINUE)
_MEM_SIZE, _EOS, _MULTIFD_FLUSH = (
    int(RamFlag.MEM_SIZE),
    int(RamFlag.EOS),
    int(RamFlag.MULTIFD_FLUSH),
)
_NOT_TAKEN = ~KNOWN_RAM_FLAGS  # refused or unknown bits


class RamSection:
    """The ram section's state across its SECTION_START/PART/END records.

    ``emit`` takes each event; ``error`` builds the protocol error (it knows
    where in the stream the record began); ``end_section`` is called at EOS,
    the last record of a ram section's data. ``sync_at_eos``: as
    :class:`~vfio_multifd.core.mainstream.MainStreamParser` takes it.
    """

    def __init__(
        self,
        *,
        page_size: int,
        sync_at_eos: bool | None,
        emit: Callable[[Event], None],
        error: Callable[[Reason, str], ProtocolError],
        end_section: Callable[[], None],
    ) -> None:
        self.page_size = page_size
        self._flag_mask = page_size - 1
        self.sync_at_eos = sync_at_eos
        self._emit = emit
        self._error = error
        self._end_section = end_section
        self.blocks: dict[str, RamBlock] = {}
        self._last_block: RamBlock | None = None
        self.sync_points = 0

    def record(self, cursor: Cursor) -> None:
        """One record: a page, a zero page, the block list, a sync point or EOS."""
        header = cursor.unpack(U64)
        flags = header & self._flag_mask
        address = header - flags
        if flags & _NOT_TAKEN:
            self._refuse_ram_flags(flags)
        kind = flags & ~_CONTINUE
        if kind in (_ZERO, _PAGE):
            block = self._block_of(cursor, flags, address)
            if kind == _ZERO:
                fill = cursor.unpack(U8)
                self._last_block = block
                self._emit(ZeroPage(block.name, address, fill))
            else:
                data = cursor.take(self.page_size)
                self._last_block = block
                self._emit(Page(block.name, address, data))
        elif kind == _MEM_SIZE:
            self._block_list(cursor, address)
        elif kind == _MULTIFD_FLUSH:
            if self.sync_at_eos:
                raise self._error(
                    Reason.MAIN_RAM,
                    "MULTIFD_FLUSH in a stream whose sync points are its EOS records",
                )
            self.sync_at_eos = False
            self._sync_point()
        elif kind == _EOS:
            if self.sync_at_eos is None:
                self.sync_at_eos = True
            if self.sync_at_eos:
                self._sync_point()
            self._end_section()
        else:
            raise self._error(Reason.MAIN_RAM, f"ram record with flags {flags:#x}")

    def _refuse_ram_flags(self, flags: int) -> None:
        for flag, what in REFUSED_RAM_FLAGS.items():
            if flags & flag:
                raise self._error(
                    Reason.MAIN_UNSUPPORTED,
                    f"ram record with flags {flags:#x}: the source uses {what}, which this "
                    "destination does not take",
                )
        raise self._error(
            Reason.MAIN_RAM, f"ram record with unknown flags {flags & ~KNOWN_RAM_FLAGS:#x}"
        )

    def _sync_point(self) -> None:
        self.sync_points += 1
        self._emit(SyncPoint(self.sync_points))

    def _block_list(self, cursor: Cursor, total: int) -> None:
        if self.blocks:
            raise self._error(Reason.MAIN_RAM, "a second block list (MEM_SIZE)")
        blocks: dict[str, RamBlock] = {}
        left = total
        while left:
            if len(blocks) == MAX_RAM_BLOCKS:
                raise self._error(
                    Reason.MAIN_RAM, f"block list of more than {MAX_RAM_BLOCKS} RAMBlocks"
                )
            name = cursor.name()
            used_length = cursor.unpack(U64)
            if not name or "\0" in name:
                raise self._error(Reason.MAIN_RAM, f"RAMBlock name {name!r} in the block list")
            if name in blocks:
                raise self._error(Reason.MAIN_RAM, f"RAMBlock {name} twice in the block list")
            if used_length == 0 or used_length % self.page_size or used_length > left:
                raise self._error(
                    Reason.MAIN_RAM,
                    f"RAMBlock {name}: used length {used_length} is not a non-zero multiple of "
                    f"{self.page_size} within the {left} bytes the block list has left "
                    f"(of {total})",
                )
            blocks[name] = RamBlock(name, used_length)
            left -= used_length
        self.blocks = blocks
        self._emit(BlockList(tuple(blocks.values())))

    def _block_of(self, cursor: Cursor, flags: int, offset: int) -> RamBlock:
        if flags & _CONTINUE:
            block = self._last_block
            if block is None:
                raise self._error(Reason.MAIN_RAM, "CONTINUE record before any RAMBlock was named")
        else:
            name = cursor.name()
            found = self.blocks.get(name)
            if found is None:
                raise self._error(
                    Reason.MAIN_RAM, f"page of RAMBlock {name!r}, which is not in the block list"
                )
            block = found
        if offset + self.page_size > block.used_length:
            raise self._error(
                Reason.MAIN_RAM,
                f"page at offset {offset:#x} of RAMBlock {block.name}: past its used "
                f"length {block.used_length:#x}",
            )
        return block
