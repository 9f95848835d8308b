"""QEMU's migration stream, as the main channel carries it: its vocabulary.

The record types, ``ram`` record flags and commands of QEMU's ``savevm.c``
and ``ram.c``, the bounds this destination puts on them, and the events
:class:`~.mainstream.MainStreamParser` emits (a few frozen dataclasses: the
only vocabulary between the parser and whoever drives it). Layouts are in
PROTOCOL.md section 7; all integers are big-endian. Pure.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

# --- the stream's format -------------------------------------------------------------

QEMU_VM_FILE_VERSION = 3
DEFAULT_PAGE_SIZE = 4096


class Record(enum.IntEnum):
    """The byte that starts every top-level record (``savevm.c``)."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


class RamFlag(enum.IntFlag):
    """The low bits of a ram record's be64 ``offset | flags`` (``ram.c``)."""

    FULL = 0x01  # obsolete since 2009
    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80  # RDMA
    COMPRESS_PAGE = 0x100
    MULTIFD_FLUSH = 0x200


#: Ram record flags refused by name: features this destination does not implement.
REFUSED_RAM_FLAGS = {
    RamFlag.FULL: "the obsolete FULL flag",
    RamFlag.XBZRLE: "XBZRLE compression (capability xbzrle)",
    RamFlag.HOOK: "RDMA (an rdma: URI)",
    RamFlag.COMPRESS_PAGE: "compressed pages (capability compress)",
}
KNOWN_RAM_FLAGS = int(
    RamFlag.ZERO | RamFlag.MEM_SIZE | RamFlag.PAGE | RamFlag.EOS | RamFlag.CONTINUE
    | RamFlag.MULTIFD_FLUSH
)


class Command(enum.IntEnum):
    """``QEMU_VM_COMMAND`` numbers (``savevm.c`` ``enum qemu_vm_cmd``)."""

    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


REFUSED_COMMANDS = {
    Command.OPEN_RETURN_PATH: "a return path (capability return-path): this destination "
    "never answers on the main channel",
    Command.POSTCOPY_ADVISE: "postcopy (capability postcopy-ram)",
    Command.POSTCOPY_LISTEN: "postcopy",
    Command.POSTCOPY_RUN: "postcopy",
    Command.POSTCOPY_RAM_DISCARD: "postcopy",
    Command.PACKAGED: "postcopy (a packaged stream)",
    Command.ENABLE_COLO: "COLO (capability x-colo)",
    Command.POSTCOPY_RESUME: "postcopy recovery",
    Command.RECV_BITMAP: "postcopy recovery",
}

#: Capabilities named in the configuration that change the stream in ways not followed here.
REFUSED_CAPABILITIES = {
    "x-ignore-shared": "x-ignore-shared (the block list then carries addresses)",
    "mapped-ram": "mapped-ram (a file migration format)",
}

DESCRIPTION_HEADER_SIZE = 6  # QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION, be32 length

#: Bounds checked before anything is buffered.
MAX_MACHINE_NAME = 256
MAX_CAPABILITIES = 64
MAX_RAM_BLOCKS = 1024
DEFAULT_MAX_DESCRIPTION = 16 << 20


def is_vfio_idstr(idstr: str) -> bool:
    """VFIO registers its sections as ``<device path>/vfio`` (or ``vfio`` alone)."""
    return idstr == "vfio" or idstr.endswith("/vfio")


# --- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RamBlock:
    """One RAMBlock of the block list: its name (``pc.ram``) and used length in bytes."""

    name: str
    used_length: int


@dataclass(frozen=True, slots=True)
class Configuration:
    machine: str
    capabilities: tuple[str, ...] = ()
    uuid: bytes | None = None


@dataclass(frozen=True, slots=True)
class Section:
    """A section header: ``kind`` is a SECTION_* record; START and FULL name the device."""

    kind: Record
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class BlockList:
    blocks: tuple[RamBlock, ...]


@dataclass(frozen=True, slots=True)
class ZeroPage:
    """A page of ``block`` at ``offset`` whose every byte is ``fill`` (QEMU 7.2 allows any)."""

    block: str
    offset: int
    fill: int


@dataclass(frozen=True, slots=True)
class Page:
    block: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SyncPoint:
    """Every multifd channel sends one SYNC packet for each of these (``number`` from 1)."""

    number: int


@dataclass(frozen=True, slots=True)
class VfioData:
    """Bytes of a VFIO device's pre-copy state (a piece of a DEV_DATA_STATE block)."""

    idstr: str
    instance_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CommandEvent:
    command: Command
    data: bytes


@dataclass(frozen=True, slots=True)
class Unfollowed:
    """From ``offset`` on (the data of this section) the stream is kept raw, not parsed."""

    section: Section
    offset: int
    why: str


@dataclass(frozen=True, slots=True)
class Ended:
    """The stream closed at a verified end. ``followed``: parsed to the end, not recognised
    by its tail. ``description`` is the VM description's JSON text (None if none was sent)."""

    followed: bool
    description: bytes | None


Event = (
    Configuration | Section | BlockList | ZeroPage | Page | SyncPoint | VfioData
    | CommandEvent | Unfollowed | Ended
)


def description_problem(body: bytes) -> str:
    """What is wrong with a VM description's text as QEMU writes it, or '' if nothing."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        return f"not JSON ({error})"
    if not isinstance(value, dict) or not isinstance(value.get("devices"), list):
        return "not a JSON object with a devices list"
    return ""
