"""Reading the main stream's records from a buffer that may end mid-record.

Pure: a :class:`Cursor` reads big-endian fields from the bytes received so
far and raises :class:`NeedMore` when the unit being parsed is not all there
yet, so that the parser starts that unit again once more bytes come.
"""

from __future__ import annotations

import struct

U8 = struct.Struct(">B")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


class NeedMore(Exception):
    """Not enough bytes for the unit being parsed; nothing was consumed."""


class Cursor:
    __slots__ = ("buffer", "end", "pos")

    def __init__(self, buffer: bytearray, pos: int) -> None:
        self.buffer = buffer
        self.pos = pos
        self.end = len(buffer)

    def take(self, size: int) -> bytes:
        if self.pos + size > self.end:
            raise NeedMore
        data = bytes(self.buffer[self.pos : self.pos + size])
        self.pos += size
        return data

    def unpack(self, layout: struct.Struct) -> int:
        if self.pos + layout.size > self.end:
            raise NeedMore
        (value,) = layout.unpack_from(self.buffer, self.pos)
        self.pos += layout.size
        return int(value)

    def peek(self) -> int:
        if self.pos >= self.end:
            raise NeedMore
        return self.buffer[self.pos]

    def name(self) -> str:
        """A u8 length and that many bytes (idstrs, block names)."""
        size = self.unpack(U8)
        return self.take(size).decode("utf-8", "surrogateescape")
