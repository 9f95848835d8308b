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
from then on only keeps the stream's tail, whose end is recognised by its
shape (:mod:`.mainstream_tail`). A stream without a VM description
(``suppress-vmdesc``) can then not be told complete, and is an error. The ram
section's records are :mod:`.mainstream_ram`'s, the other top-level records
:mod:`.mainstream_records`'.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable

from ..errors import ProtocolError, Reason
from .mainstream_cursor import U8, U32, U64, Cursor, NeedMore
from .mainstream_ram import RamSection
from .mainstream_records import (
    command_event,
    configuration_record,
    configuration_subsection,
    vm_description,
)
from .mainstream_tail import StreamTail
from .savevm import (
    DEFAULT_MAX_DESCRIPTION,
    DEFAULT_PAGE_SIZE,
    QEMU_VM_FILE_VERSION,
    Configuration,
    Ended,
    Event,
    RamBlock,
    Record,
    Section,
    Unfollowed,
    VfioData,
    is_vfio_idstr,
)
from .wire import QEMU_VM_FILE_MAGIC, ConfigTag


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
        self.max_description = max_description
        self._is_vfio = vfio
        self.state = State.MAGIC
        self.error: ProtocolError | None = None
        self._events: deque[Event] = deque()
        self._buffer = bytearray()
        self._buffer_offset = 0  # stream offset of _buffer[0]
        self._pos = 0  # where the unit being parsed starts in _buffer
        self._configuration = Configuration("")
        self._tail = StreamTail(max_description)  # UNFOLLOWED: the last bytes of the stream
        self._sections: dict[int, Section] = {}  # by section id, from START/FULL
        self._section: Section | None = None  # the section whose data is being parsed
        self._ram = RamSection(
            page_size=page_size,
            sync_at_eos=sync_at_eos,
            emit=self._emit,
            error=self._error,
            end_section=self._end_of_section_data,
        )
        self._vfio_left = 0  # bytes of the DEV_DATA_STATE block still to come
        self._description: bytes | None = None
        self.bytes_received = 0

    @property
    def blocks(self) -> dict[str, RamBlock]:
        """The RAMBlocks of the block list, by name (none before it)."""
        return self._ram.blocks

    @property
    def sync_points(self) -> int:
        return self._ram.sync_points

    @property
    def sync_at_eos(self) -> bool | None:
        """Whether each EOS is a sync point; None until the stream has said."""
        return self._ram.sync_at_eos

    # -- feeding --------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state in (State.ERROR, State.ENDED):
            return
        self.bytes_received += len(data)
        if self.state is State.UNFOLLOWED:
            self._tail.keep(data)
            return
        self._buffer += data
        try:
            self._parse()
        except ProtocolError as error:
            self.state = State.ERROR
            self.error = error
        if self.state is State.UNFOLLOWED and self._buffer:
            self._tail.keep(self._buffer)
            self._buffer.clear()

    def eof(self) -> None:
        if self.state in (State.ERROR, State.ENDED):
            return
        try:
            if self.state is State.UNFOLLOWED:
                self._events.append(Ended(False, self._tail.description(self.bytes_received)))
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
        steps: dict[State, Callable[[Cursor], None]] = {
            State.MAGIC: self._magic,
            State.TOP: self._top,
            State.CONFIGURATION: self._configuration_subsection,
            State.RAM: self._ram.record,
            State.VFIO: self._vfio_tag,
            State.VFIO_DATA: self._vfio_data,
            State.VFIO_SETUP: self._vfio_setup_end,
            State.FOOTER: self._footer,
            State.AFTER_EOF: self._after_eof,
            State.DESCRIBED: self._described,
        }
        while self.state in steps:
            cursor = Cursor(self._buffer, self._pos)
            try:
                steps[self.state](cursor)
            except NeedMore:
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

    def _magic(self, cursor: Cursor) -> None:
        magic = cursor.take(4)
        if magic != QEMU_VM_FILE_MAGIC:
            raise self._error(
                Reason.MAIN_MAGIC, f"file magic {magic.hex()}, expected {QEMU_VM_FILE_MAGIC.hex()} (QEVM)"
            )
        version = cursor.unpack(U32)
        if version != QEMU_VM_FILE_VERSION:
            raise self._error(
                Reason.MAIN_VERSION, f"file version {version}, expected {QEMU_VM_FILE_VERSION}"
            )
        self.state = State.TOP

    def _top(self, cursor: Cursor) -> None:
        kind = cursor.unpack(U8)
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

    def _configuration_record(self, cursor: Cursor) -> None:
        self._configuration = configuration_record(cursor, self._error)
        self.state = State.CONFIGURATION

    def _configuration_subsection(self, cursor: Cursor) -> None:
        """Subsections of the configuration (``savevm.c``): the ones QEMU defines, or none."""
        config = self._configuration
        if cursor.peek() != Record.SUBSECTION:
            self._emit(config)
            self.state = State.TOP
            return
        cursor.take(1)
        config = configuration_subsection(cursor, config, self.page_size, self._error)
        self._configuration = config

    def _section_header(self, cursor: Cursor, kind: Record) -> None:
        section_id = cursor.unpack(U32)
        idstr = cursor.name()
        instance_id = cursor.unpack(U32)
        version_id = cursor.unpack(U32)
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

    def _section_continued(self, cursor: Cursor, kind: Record) -> None:
        section_id = cursor.unpack(U32)
        known = self._sections.get(section_id)
        if known is None:
            name = "SECTION_PART" if kind == Record.SECTION_PART else "SECTION_END"
            raise self._error(
                Reason.MAIN_SECTION, f"{name} of section {section_id}, which never started"
            )
        self._begin_section(
            Section(kind, section_id, known.idstr, known.instance_id, known.version_id), cursor
        )

    def _begin_section(self, section: Section, cursor: Cursor) -> None:
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

    def _unfollowed(self, section: Section, cursor: Cursor, why: str) -> None:
        self._emit(Unfollowed(section, self._buffer_offset + cursor.pos, why))
        self.state = State.UNFOLLOWED

    def _footer(self, cursor: Cursor) -> None:
        section = self._section
        assert section is not None
        if cursor.peek() == Record.SECTION_FOOTER:
            cursor.take(1)
            section_id = cursor.unpack(U32)
            if section_id != section.section_id:
                raise self._error(
                    Reason.MAIN_SECTION,
                    f"section footer names section {section_id}, expected {section.section_id}",
                )
        # No footer: machine types before 2.4 (no send_section_footer).
        self._section = None
        self.state = State.TOP

    def _end_of_section_data(self) -> None:
        self.state = State.FOOTER

    def _command(self, cursor: Cursor) -> None:
        self._emit(command_event(cursor, self._error))

    def _after_eof(self, cursor: Cursor) -> None:
        kind = cursor.unpack(U8)
        if kind != Record.VMDESCRIPTION:
            raise self._error(
                Reason.MAIN_END,
                f"record type {kind:#04x} after QEMU_VM_EOF; only QEMU_VM_VMDESCRIPTION may follow",
            )
        body = vm_description(cursor, self.max_description, self._error)
        self._description = body
        self.state = State.DESCRIBED

    def _described(self, cursor: Cursor) -> None:
        cursor.peek()  # raises NeedMore when nothing follows, as it should
        raise self._error(Reason.MAIN_END, "bytes after the VM description")

    # -- VFIO's framing (hw/vfio/migration.c) ---------------------------------

    def _vfio_tag(self, cursor: Cursor) -> None:
        tag = cursor.unpack(U64)
        section = self._section
        assert section is not None
        if tag == ConfigTag.END_OF_STATE or tag == ConfigTag.DEV_INIT_DATA_SENT:
            self.state = State.FOOTER
        elif tag == ConfigTag.DEV_DATA_STATE:
            self._vfio_left = cursor.unpack(U64)
            self.state = State.VFIO_DATA
        elif tag == ConfigTag.DEV_SETUP_STATE:
            self.state = State.VFIO_SETUP
        elif tag == ConfigTag.DEV_CONFIG_STATE:
            self._unfollowed(
                section, cursor, "VFIO config state (PCI vmstate without a length prefix)"
            )
        else:
            raise self._error(Reason.MAIN_VFIO, f"unknown VFIO tag {tag:#018x}")

    def _vfio_data(self, cursor: Cursor) -> None:
        section = self._section
        assert section is not None
        if self._vfio_left:
            size = min(self._vfio_left, cursor.end - cursor.pos)
            if size == 0:
                raise NeedMore
            data = cursor.take(size)
            self._vfio_left -= size
            self._emit(VfioData(section.idstr, section.instance_id, data))
        if not self._vfio_left:
            self.state = State.VFIO

    def _vfio_setup_end(self, cursor: Cursor) -> None:
        tag = cursor.unpack(U64)
        if tag != ConfigTag.END_OF_STATE:
            raise self._error(
                Reason.MAIN_VFIO,
                f"VFIO SETUP_STATE followed by {tag:#018x}, expected END_OF_STATE "
                f"{ConfigTag.END_OF_STATE:#018x}",
            )
        self.state = State.FOOTER

    # -- the end --------------------------------------------------------------

    def _truncated(self) -> ProtocolError:
        return self._error(
            Reason.MAIN_TRUNCATED,
            f"stream closed in state {self.state.value} with {len(self._buffer)} bytes of an "
            "unfinished record"
            + ("" if self.state is not State.VFIO_DATA else f" ({self._vfio_left} VFIO data bytes missing)"),
        )
