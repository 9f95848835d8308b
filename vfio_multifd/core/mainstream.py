"""QEMU's main migration channel, parsed incrementally: bytes in, events out.

Pure: no sockets, no files, no event loop. Like the channel decoder, feeding
never raises a protocol error: :meth:`MainStreamParser.next_event` raises it
once every event before it has been taken. The records, flags, bounds and
events are ``savevm.py``'s (PROTOCOL.md section 7; QEMU's ``savevm.c``,
``ram.c`` and ``hw/vfio/migration.c``).

What is followed: the file header, ``QEMU_VM_CONFIGURATION`` (with its known
subsections), ``QEMU_VM_COMMAND``, the ``ram`` section (block list, ZERO and
PAGE records, sync points), VFIO's framing inside a VFIO device's sections,
``QEMU_VM_EOF`` and ``QEMU_VM_VMDESCRIPTION``. Any other device's section is
vmstate without a length prefix: it cannot be skipped without the device's
layout. At the first such section the parser emits :class:`Unfollowed` and
from then on only keeps the stream's tail; at end of stream it recognises the
end by its shape: ``QEMU_VM_EOF``, then ``QEMU_VM_VMDESCRIPTION`` whose be32
length ends exactly at the end of the stream and whose body is a JSON object
with a ``devices`` list. A stream without a VM description (``suppress-vmdesc``)
can then not be told complete, and is an error.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable

from ..errors import ProtocolError, Reason
from .savevm import (
    DEFAULT_MAX_DESCRIPTION,
    DEFAULT_PAGE_SIZE,
    DESCRIPTION_HEADER_SIZE,
    KNOWN_RAM_FLAGS,
    MAX_CAPABILITIES,
    MAX_MACHINE_NAME,
    MAX_RAM_BLOCKS,
    QEMU_VM_FILE_VERSION,
    REFUSED_CAPABILITIES,
    REFUSED_COMMANDS,
    REFUSED_RAM_FLAGS,
    BlockList,
    Command,
    CommandEvent,
    Configuration,
    Ended,
    Event,
    Page,
    RamBlock,
    RamFlag,
    Record,
    Section,
    SyncPoint,
    Unfollowed,
    VfioData,
    ZeroPage,
    description_problem,
    is_vfio_idstr,
)
from .wire import QEMU_VM_FILE_MAGIC, ConfigTag

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
# Plain ints for the per-record path (IntFlag arithmetic costs a microsecond a go).
_ZERO, _PAGE, _CONTINUE = int(RamFlag.ZERO), int(RamFlag.PAGE), int(RamFlag.CONTINUE)
_MEM_SIZE, _EOS, _MULTIFD_FLUSH = int(RamFlag.MEM_SIZE), int(RamFlag.EOS), int(RamFlag.MULTIFD_FLUSH)
_NOT_TAKEN = ~KNOWN_RAM_FLAGS  # refused or unknown bits


class _NeedMore(Exception):
    """Not enough bytes for the unit being parsed; nothing was consumed."""


class _Cursor:
    __slots__ = ("buffer", "end", "pos")

    def __init__(self, buffer: bytearray, pos: int) -> None:
        self.buffer = buffer
        self.pos = pos
        self.end = len(buffer)

    def take(self, size: int) -> bytes:
        if self.pos + size > self.end:
            raise _NeedMore
        data = bytes(self.buffer[self.pos : self.pos + size])
        self.pos += size
        return data

    def unpack(self, layout: struct.Struct) -> int:
        if self.pos + layout.size > self.end:
            raise _NeedMore
        (value,) = layout.unpack_from(self.buffer, self.pos)
        self.pos += layout.size
        return int(value)

    def peek(self) -> int:
        if self.pos >= self.end:
            raise _NeedMore
        return self.buffer[self.pos]

    def name(self) -> str:
        """A u8 length and that many bytes (idstrs, block names)."""
        size = self.unpack(_U8)
        return self.take(size).decode("utf-8", "surrogateescape")


class State(enum.Enum):
    MAGIC = "magic"
    TOP = "top"  # the next top-level record
    CONFIGURATION = "configuration"  # its subsections, if any
    RAM = "ram"  # the ram section's records
    VFIO = "vfio"  # a VFIO section's tags
    VFIO_DATA = "vfio-data"  # inside a DEV_DATA_STATE block
    VFIO_SETUP = "vfio-setup"  # after DEV_SETUP_STATE: END_OF_STATE must follow
    FOOTER = "footer"  # after a section's data
    AFTER_EOF = "after-eof"  # QEMU_VM_EOF seen; a VM description may follow
    DESCRIBED = "described"  # the VM description seen: nothing may follow
    UNFOLLOWED = "unfollowed"  # keeping the tail only
    ENDED = "ended"
    ERROR = "error"


class MainStreamParser:
    """Parses one main channel. Feed :meth:`receive_data`, drain :meth:`next_event`,
    call :meth:`eof` when the peer closes (then drain again).

    ``sync_at_eos``: whether every EOS of the ram section is a sync point (QEMU
    7.2, and machine types 7.2 and older on newer QEMUs) or only MULTIFD_FLUSH
    records are; None decides from the stream: a MULTIFD_FLUSH before the
    first EOS means the latter. ``vfio`` says which sections are VFIO's.
    """

    def __init__(
        self,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        max_description: int = DEFAULT_MAX_DESCRIPTION,
        sync_at_eos: bool | None = None,
        vfio: Callable[[str], bool] = is_vfio_idstr,
    ) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, not {page_size}")
        self.page_size = page_size
        self._flag_mask = page_size - 1
        self.max_description = max_description
        self.sync_at_eos = sync_at_eos
        self._is_vfio = vfio
        self.state = State.MAGIC
        self.error: ProtocolError | None = None
        self._events: deque[Event] = deque()
        self._buffer = bytearray()
        self._buffer_offset = 0  # stream offset of _buffer[0]
        self._pos = 0  # where the unit being parsed starts in _buffer
        self._configuration = Configuration("")
        self._tail = bytearray()  # UNFOLLOWED: the last bytes of the stream
        self._tail_keep = max_description + DESCRIPTION_HEADER_SIZE
        self._sections: dict[int, Section] = {}  # by section id, from START/FULL
        self._section: Section | None = None  # the section whose data is being parsed
        self.blocks: dict[str, RamBlock] = {}
        self._last_block: RamBlock | None = None
        self._vfio_left = 0  # bytes of the DEV_DATA_STATE block still to come
        self._description: bytes | None = None
        self.sync_points = 0
        self.bytes_received = 0

    # -- feeding --------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state in (State.ERROR, State.ENDED):
            return
        self.bytes_received += len(data)
        if self.state is State.UNFOLLOWED:
            self._keep_tail(data)
            return
        self._buffer += data
        try:
            self._parse()
        except ProtocolError as error:
            self.state = State.ERROR
            self.error = error
        if self.state is State.UNFOLLOWED and self._buffer:
            self._keep_tail(self._buffer)
            self._buffer.clear()

    def eof(self) -> None:
        if self.state in (State.ERROR, State.ENDED):
            return
        try:
            if self.state is State.UNFOLLOWED:
                self._events.append(Ended(False, self._description_from_tail()))
            elif self.state in (State.AFTER_EOF, State.DESCRIBED) and not self._buffer:
                self._events.append(Ended(True, self._description))
            else:
                raise self._truncated()
            self.state = State.ENDED
        except ProtocolError as error:
            self.state = State.ERROR
            self.error = error

    def next_event(self) -> Event | None:
        if self._events:
            return self._events.popleft()
        if self.error is not None:
            raise self.error.with_traceback(None)
        return None

    @property
    def offset(self) -> int:
        """Stream offset of the first byte not yet parsed."""
        return self._buffer_offset + self._pos

    # -- the loop -------------------------------------------------------------

    def _parse(self) -> None:
        steps: dict[State, Callable[[_Cursor], None]] = {
            State.MAGIC: self._magic,
            State.TOP: self._top,
            State.CONFIGURATION: self._configuration_subsection,
            State.RAM: self._ram_record,
            State.VFIO: self._vfio_tag,
            State.VFIO_DATA: self._vfio_data,
            State.VFIO_SETUP: self._vfio_setup_end,
            State.FOOTER: self._footer,
            State.AFTER_EOF: self._after_eof,
            State.DESCRIBED: self._described,
        }
        while self.state in steps:
            cursor = _Cursor(self._buffer, self._pos)
            try:
                steps[self.state](cursor)
            except _NeedMore:
                break
            self._pos = cursor.pos
        # Drop what was parsed once per feed, not once per record.
        del self._buffer[: self._pos]
        self._buffer_offset += self._pos
        self._pos = 0

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _error(self, reason: Reason, message: str) -> ProtocolError:
        section = self._section
        where = f"main stream offset {self._buffer_offset + self._pos}"
        if section is not None:
            where += f", section {section.section_id} ({section.idstr})"
        return ProtocolError(reason, f"{where}: {message}", device="main channel")

    # -- top level ------------------------------------------------------------

    def _magic(self, cursor: _Cursor) -> None:
        magic = cursor.take(4)
        if magic != QEMU_VM_FILE_MAGIC:
            raise self._error(
                Reason.MAIN_MAGIC, f"file magic {magic.hex()}, expected {QEMU_VM_FILE_MAGIC.hex()} (QEVM)"
            )
        version = cursor.unpack(_U32)
        if version != QEMU_VM_FILE_VERSION:
            raise self._error(
                Reason.MAIN_VERSION, f"file version {version}, expected {QEMU_VM_FILE_VERSION}"
            )
        self.state = State.TOP

    def _top(self, cursor: _Cursor) -> None:
        kind = cursor.unpack(_U8)
        self._section = None
        if kind == Record.CONFIGURATION:
            self._configuration_record(cursor)
        elif kind in (Record.SECTION_START, Record.SECTION_FULL):
            self._section_header(cursor, Record(kind))
        elif kind in (Record.SECTION_PART, Record.SECTION_END):
            self._section_continued(cursor, Record(kind))
        elif kind == Record.COMMAND:
            self._command(cursor)
        elif kind == Record.EOF:
            self.state = State.AFTER_EOF
        else:
            known = kind in Record._value2member_map_
            raise self._error(
                Reason.MAIN_RECORD,
                f"record type {kind:#04x} ({Record(kind).name}) where a top-level record must be"
                if known
                else f"unknown record type {kind:#04x}",
            )

    def _configuration_record(self, cursor: _Cursor) -> None:
        size = cursor.unpack(_U32)
        if size > MAX_MACHINE_NAME:
            raise self._error(
                Reason.MAIN_RECORD,
                f"configuration: machine name of {size} bytes, at most {MAX_MACHINE_NAME}",
            )
        machine = cursor.take(size).decode("utf-8", "surrogateescape")
        self._configuration = Configuration(machine)
        self.state = State.CONFIGURATION

    def _configuration_subsection(self, cursor: _Cursor) -> None:
        """Subsections of the configuration (``savevm.c``): the ones QEMU defines, or none."""
        config = self._configuration
        if cursor.peek() != Record.SUBSECTION:
            self._emit(config)
            self.state = State.TOP
            return
        cursor.take(1)
        name = cursor.name()
        cursor.unpack(_U32)  # its version
        if name == "configuration/target-page-bits":
            bits = cursor.unpack(_U32)
            if not 9 <= bits <= 30 or 1 << bits != self.page_size:
                raise self._error(
                    Reason.MAIN_UNSUPPORTED,
                    f"target page size 2**{bits}; this destination takes {self.page_size}-byte pages",
                )
        elif name == "configuration/capabilities":
            count = cursor.unpack(_U32)
            if count > MAX_CAPABILITIES:
                raise self._error(
                    Reason.MAIN_RECORD, f"{count} capabilities, at most {MAX_CAPABILITIES}"
                )
            capabilities = tuple(cursor.name() for _ in range(count))
            for capability in capabilities:
                if capability in REFUSED_CAPABILITIES:
                    raise self._error(
                        Reason.MAIN_UNSUPPORTED,
                        f"the source uses {REFUSED_CAPABILITIES[capability]}, which this "
                        "destination does not take",
                    )
            config = Configuration(config.machine, config.capabilities + capabilities, config.uuid)
        elif name == "configuration/uuid":
            uuid = cursor.take(16)
            config = Configuration(config.machine, config.capabilities, uuid)
        else:
            raise self._error(Reason.MAIN_RECORD, f"unknown configuration subsection {name!r}")
        self._configuration = config

    def _section_header(self, cursor: _Cursor, kind: Record) -> None:
        section_id = cursor.unpack(_U32)
        idstr = cursor.name()
        instance_id = cursor.unpack(_U32)
        version_id = cursor.unpack(_U32)
        section = Section(kind, section_id, idstr, instance_id, version_id)
        known = self._sections.get(section_id)
        if kind == Record.SECTION_START and known is not None:
            raise self._error(
                Reason.MAIN_SECTION,
                f"SECTION_START of section {section_id} ({idstr}) again: it started "
                f"as {known.idstr}",
            )
        if known is not None and (known.idstr, known.instance_id) != (idstr, instance_id):
            raise self._error(
                Reason.MAIN_SECTION,
                f"section {section_id} names {idstr} instance {instance_id}, but it is "
                f"{known.idstr} instance {known.instance_id}",
            )
        self._sections[section_id] = section
        self._begin_section(section, cursor)

    def _section_continued(self, cursor: _Cursor, kind: Record) -> None:
        section_id = cursor.unpack(_U32)
        known = self._sections.get(section_id)
        if known is None:
            name = "SECTION_PART" if kind == Record.SECTION_PART else "SECTION_END"
            raise self._error(
                Reason.MAIN_SECTION, f"{name} of section {section_id}, which never started"
            )
        self._begin_section(
            Section(kind, section_id, known.idstr, known.instance_id, known.version_id), cursor
        )

    def _begin_section(self, section: Section, cursor: _Cursor) -> None:
        self._section = section
        self._emit(section)
        if section.idstr == "ram":
            if section.kind == Record.SECTION_FULL:
                self._unfollowed(section, cursor, "a ram section sent whole (snapshot format)")
            else:
                self.state = State.RAM
        elif self._is_vfio(section.idstr):
            self.state = State.VFIO
        else:
            self._unfollowed(section, cursor, "device state without a length prefix (vmstate)")

    def _unfollowed(self, section: Section, cursor: _Cursor, why: str) -> None:
        self._emit(Unfollowed(section, self._buffer_offset + cursor.pos, why))
        self.state = State.UNFOLLOWED

    def _footer(self, cursor: _Cursor) -> None:
        section = self._section
        assert section is not None
        if cursor.peek() == Record.SECTION_FOOTER:
            cursor.take(1)
            section_id = cursor.unpack(_U32)
            if section_id != section.section_id:
                raise self._error(
                    Reason.MAIN_SECTION,
                    f"section footer names section {section_id}, expected {section.section_id}",
                )
        # No footer: machine types before 2.4 (no send_section_footer).
        self._section = None
        self.state = State.TOP

    def _command(self, cursor: _Cursor) -> None:
        number, size = cursor.unpack(_U16), cursor.unpack(_U16)
        data = cursor.take(size)
        try:
            command = Command(number)
        except ValueError:
            raise self._error(Reason.MAIN_RECORD, f"unknown QEMU_VM_COMMAND {number}") from None
        if command in REFUSED_COMMANDS:
            raise self._error(
                Reason.MAIN_UNSUPPORTED,
                f"QEMU_VM_COMMAND {command.name}: the source uses {REFUSED_COMMANDS[command]}, "
                "which this destination does not take",
            )
        self._emit(CommandEvent(command, data))

    def _after_eof(self, cursor: _Cursor) -> None:
        kind = cursor.unpack(_U8)
        if kind != Record.VMDESCRIPTION:
            raise self._error(
                Reason.MAIN_END,
                f"record type {kind:#04x} after QEMU_VM_EOF; only QEMU_VM_VMDESCRIPTION may follow",
            )
        size = cursor.unpack(_U32)
        if size > self.max_description:
            raise self._error(
                Reason.MAIN_RECORD,
                f"VM description of {size} bytes, at most {self.max_description}",
            )
        body = cursor.take(size)
        problem = description_problem(body)
        if problem:
            raise self._error(Reason.MAIN_RECORD, f"VM description: {problem}")
        self._description = body
        self.state = State.DESCRIBED

    def _described(self, cursor: _Cursor) -> None:
        cursor.peek()  # raises _NeedMore when nothing follows, as it should
        raise self._error(Reason.MAIN_END, "bytes after the VM description")

    # -- the ram section ------------------------------------------------------

    def _ram_record(self, cursor: _Cursor) -> None:
        header = cursor.unpack(_U64)
        flags = header & self._flag_mask
        address = header - flags
        if flags & _NOT_TAKEN:
            self._refuse_ram_flags(flags)
        kind = flags & ~_CONTINUE
        if kind in (_ZERO, _PAGE):
            block = self._block_of(cursor, flags, address)
            if kind == _ZERO:
                fill = cursor.unpack(_U8)
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
            self.state = State.FOOTER
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

    def _block_list(self, cursor: _Cursor, total: int) -> None:
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
            used_length = cursor.unpack(_U64)
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

    def _block_of(self, cursor: _Cursor, flags: int, offset: int) -> RamBlock:
        if flags & _CONTINUE:
            block = self._last_block
            if block is None:
                raise self._error(
                    Reason.MAIN_RAM, "CONTINUE record before any RAMBlock was named"
                )
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

    # -- VFIO's framing (hw/vfio/migration.c) ---------------------------------

    def _vfio_tag(self, cursor: _Cursor) -> None:
        tag = cursor.unpack(_U64)
        section = self._section
        assert section is not None
        if tag == ConfigTag.END_OF_STATE or tag == ConfigTag.DEV_INIT_DATA_SENT:
            self.state = State.FOOTER
        elif tag == ConfigTag.DEV_DATA_STATE:
            self._vfio_left = cursor.unpack(_U64)
            self.state = State.VFIO_DATA
        elif tag == ConfigTag.DEV_SETUP_STATE:
            self.state = State.VFIO_SETUP
        elif tag == ConfigTag.DEV_CONFIG_STATE:
            self._unfollowed(
                section, cursor, "VFIO config state (PCI vmstate without a length prefix)"
            )
        else:
            raise self._error(Reason.MAIN_VFIO, f"unknown VFIO tag {tag:#018x}")

    def _vfio_data(self, cursor: _Cursor) -> None:
        section = self._section
        assert section is not None
        if self._vfio_left:
            size = min(self._vfio_left, cursor.end - cursor.pos)
            if size == 0:
                raise _NeedMore
            data = cursor.take(size)
            self._vfio_left -= size
            self._emit(VfioData(section.idstr, section.instance_id, data))
        if not self._vfio_left:
            self.state = State.VFIO

    def _vfio_setup_end(self, cursor: _Cursor) -> None:
        tag = cursor.unpack(_U64)
        if tag != ConfigTag.END_OF_STATE:
            raise self._error(
                Reason.MAIN_VFIO,
                f"VFIO SETUP_STATE followed by {tag:#018x}, expected END_OF_STATE "
                f"{ConfigTag.END_OF_STATE:#018x}",
            )
        self.state = State.FOOTER

    # -- the end --------------------------------------------------------------

    def _keep_tail(self, data: bytes | bytearray | memoryview) -> None:
        self._tail += data
        if len(self._tail) > 2 * self._tail_keep:
            del self._tail[: len(self._tail) - self._tail_keep]

    def _description_from_tail(self) -> bytes:
        """The VM description that ends the stream exactly, preceded by QEMU_VM_EOF."""
        tail = self._tail
        marker = bytes([Record.EOF, Record.VMDESCRIPTION])
        start = tail.find(marker)
        while start != -1:
            body_at = start + DESCRIPTION_HEADER_SIZE
            if body_at <= len(tail):
                (size,) = _U32.unpack_from(tail, start + 2)
                if body_at + size == len(tail):
                    body = bytes(tail[body_at:])
                    if not description_problem(body):
                        return body
            start = tail.find(marker, start + 1)
        raise ProtocolError(
            Reason.MAIN_END,
            f"main stream closed after {self.bytes_received} bytes without a recognisable end: "
            "it was not followed past an opaque section, so it must end with QEMU_VM_EOF and "
            f"a VM description (JSON, at most {self.max_description} bytes) that ends exactly "
            "at the end of the stream",
            device="main channel",
        )

    def _truncated(self) -> ProtocolError:
        return self._error(
            Reason.MAIN_TRUNCATED,
            f"stream closed in state {self.state.value} with {len(self._buffer)} bytes of an "
            "unfinished record"
            + ("" if self.state is not State.VFIO_DATA else f" ({self._vfio_left} VFIO data bytes missing)"),
        )
