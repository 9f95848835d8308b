"""QEMU's main-stream records, encoded one by one (pure: builds bytes).

The pieces :mod:`.qemu_like` puts together into a whole migration, and that tests use
to build streams QEMU would send (or would not: a parser's refusals).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

from ..core.savevm import QEMU_VM_FILE_VERSION, Command, RamFlag, Record
from ..core.wire import QEMU_VM_FILE_MAGIC, ConfigTag

# --- main stream records -------------------------------------------------------------


def file_header() -> bytes:
    return QEMU_VM_FILE_MAGIC + struct.pack(">I", QEMU_VM_FILE_VERSION)


def configuration(machine: str, capabilities: Sequence[str] = ()) -> bytes:
    raw = machine.encode()
    out = bytes([Record.CONFIGURATION]) + struct.pack(">I", len(raw)) + raw
    if capabilities:
        out += subsection("configuration/capabilities") + struct.pack(">I", len(capabilities))
        out += b"".join(u8_string(capability) for capability in capabilities)
    return out


def subsection(name: str) -> bytes:
    return bytes([Record.SUBSECTION]) + u8_string(name) + struct.pack(">I", 1)


def u8_string(name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 255:
        raise ValueError(f"{name!r} does not fit a u8 length")
    return bytes([len(raw)]) + raw


def section_header(kind: Record, section_id: int, idstr: str = "", instance_id: int = 0,
                   version_id: int = 1) -> bytes:
    """START and FULL name the device; PART and END only the section id."""
    out = bytes([kind]) + struct.pack(">I", section_id)
    if kind in (Record.SECTION_START, Record.SECTION_FULL):
        out += u8_string(idstr) + struct.pack(">II", instance_id, version_id)
    return out


def footer(section_id: int) -> bytes:
    return bytes([Record.SECTION_FOOTER]) + struct.pack(">I", section_id)


def command(number: Command, data: bytes = b"") -> bytes:
    return bytes([Record.COMMAND]) + struct.pack(">HH", number, len(data)) + data


def vm_description(description: bytes) -> bytes:
    """``QEMU_VM_EOF`` then the VM description, as the stream ends."""
    return bytes([Record.EOF, Record.VMDESCRIPTION]) + struct.pack(">I", len(description)) + description


def ram_record(offset: int, flags: int) -> bytes:
    return struct.pack(">Q", offset | flags)


def ram_block_list(blocks: Mapping[str, int]) -> bytes:
    """MEM_SIZE with the total, then each block's name and used length."""
    out = ram_record(sum(blocks.values()), RamFlag.MEM_SIZE)
    for name, used_length in blocks.items():
        out += u8_string(name) + struct.pack(">Q", used_length)
    return out


def ram_zero(offset: int, block: str | None, fill: int = 0) -> bytes:
    """A ZERO record; ``block`` None means CONTINUE (the block named last)."""
    if block is None:
        return ram_record(offset, RamFlag.ZERO | RamFlag.CONTINUE) + bytes([fill])
    return ram_record(offset, RamFlag.ZERO) + u8_string(block) + bytes([fill])


def ram_page(offset: int, block: str | None, data: bytes) -> bytes:
    if block is None:
        return ram_record(offset, RamFlag.PAGE | RamFlag.CONTINUE) + data
    return ram_record(offset, RamFlag.PAGE) + u8_string(block) + data


def vfio_tag(tag: ConfigTag) -> bytes:
    return struct.pack(">Q", tag)


def vfio_data(data: bytes) -> bytes:
    return vfio_tag(ConfigTag.DEV_DATA_STATE) + struct.pack(">Q", len(data)) + data


