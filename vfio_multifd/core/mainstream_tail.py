"""The end of a main stream that was not followed to its end.

Pure. Past a section it cannot follow (device state without a length
prefix), the parser keeps only the stream's last bytes; at end of stream the
end is recognised by its shape: ``QEMU_VM_EOF``, then ``QEMU_VM_VMDESCRIPTION``
whose be32 length ends exactly at the end of the stream and whose body is a
JSON object with a ``devices`` list.
"""

from __future__ import annotations

from ..errors import ProtocolError, Reason
from .mainstream_cursor import U32
from .savevm import DESCRIPTION_HEADER_SIZE, Record, description_problem


class StreamTail:
    """The last bytes of a stream: enough for the largest VM description and its header."""

    def __init__(self, max_description: int) -> None:
        self.max_description = max_description
        self._tail = bytearray()
        self._keep = max_description + DESCRIPTION_HEADER_SIZE

    def keep(self, data: bytes | bytearray | memoryview) -> None:
        self._tail += data
        # Trimmed once it doubles, not at every feed.
        if len(self._tail) > 2 * self._keep:
            del self._tail[: len(self._tail) - self._keep]

    def description(self, bytes_received: int) -> bytes:
        """The VM description that ends the stream exactly, preceded by QEMU_VM_EOF."""
        tail = self._tail
        marker = bytes([Record.EOF, Record.VMDESCRIPTION])
        start = tail.find(marker)
        while start != -1:
            body_at = start + DESCRIPTION_HEADER_SIZE
            if body_at <= len(tail):
                (size,) = U32.unpack_from(tail, start + 2)
                if body_at + size == len(tail):
                    body = bytes(tail[body_at:])
                    if not description_problem(body):
                        return body
            start = tail.find(marker, start + 1)
        raise ProtocolError(
            Reason.MAIN_END,
            f"main stream closed after {bytes_received} bytes without a recognisable end: "
            "it was not followed past an opaque section, so it must end with QEMU_VM_EOF and "
            f"a VM description (JSON, at most {self.max_description} bytes) that ends exactly "
            "at the end of the stream",
            device="main channel",
        )
