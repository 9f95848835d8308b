"""What the migration core asks its driver to do: frozen values, carried out in order.

Connections are named by the driver's own ids (``conn``); the core never
holds a socket. A driver pops them after every input
(:meth:`Migration.pop_commands`) and carries each one out before the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import HandshakeError, MultifdError
from ..results import SessionStatus
from .reassembly import Chunk
from .savevm import RamBlock
from .state import Phase
from .watchdog import MissingChannels
from .wire import DeviceKey

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer


@dataclass(frozen=True, slots=True)
class ProvideBuffer:
    """The payload buffer a header waited for: read the payload into it."""

    conn: int
    buffer: PayloadBuffer


@dataclass(frozen=True, slots=True)
class PauseReading:
    """Read nothing more from ``conn`` until :class:`ResumeReading` (TCP pushes back)."""

    conn: int


@dataclass(frozen=True, slots=True)
class ResumeReading:
    conn: int


@dataclass(frozen=True, slots=True)
class Accepted:
    """``conn`` passed its handshake and joined the migration as ``channel``."""

    conn: int
    channel: int


@dataclass(frozen=True, slots=True)
class AcceptedMain:
    """``conn`` is QEMU's main channel (--main-stream): parse what it sends."""

    conn: int


@dataclass(frozen=True, slots=True)
class CreateRamImages:
    """The main stream's block list came: create the RAM images (on the RAM writer)."""

    blocks: tuple[RamBlock, ...]


@dataclass(frozen=True, slots=True)
class WriteRam:
    """Queue to the one RAM writer, first in first out: ``pages`` (block, offset,
    data or a fill byte), then ``main`` bytes of the main stream; then call
    ``ram_written(conn, nbytes)``. One writer keeps the order the sync points decided."""

    conn: int
    pages: tuple[tuple[str, int, memoryview | int], ...]
    main: bytes
    nbytes: int


@dataclass(frozen=True, slots=True)
class WritePrecopy:
    """Queue ``data`` (pre-copy VFIO bytes of the main stream) to ``device``'s writer,
    behind its earlier pre-copy bytes and before any chunk; then call
    ``ram_written(conn, nbytes)`` (they are charged as main-stream bytes)."""

    conn: int
    device: DeviceKey
    data: bytes
    nbytes: int


@dataclass(frozen=True, slots=True)
class StrayPrecopy:
    """The main stream carries pre-copy data of ``device``, which is no ``--device``:
    it stays in the main-stream file only (said once per device)."""

    device: DeviceKey


@dataclass(frozen=True, slots=True)
class Refuse:
    """``conn`` is refused (counted already): reset it; the migration goes on.
    ``late``: the migration was ending anyway (the refusal did not cause its end)."""

    conn: int
    error: HandshakeError
    late: bool


@dataclass(frozen=True, slots=True)
class ResetConnection:
    """Hang up on ``conn`` with a reset (the source reads it as a failure)."""

    conn: int
    why: MultifdError | None


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Hang up on ``conn`` cleanly: only ever sent once the migration completed."""

    conn: int


@dataclass(frozen=True, slots=True)
class WakeLoader:
    """``device``'s next chunk is there: its loader should call ``take_batch``."""

    device: DeviceKey


@dataclass(frozen=True, slots=True)
class Spill:
    """Write ``chunk``'s bytes to the spill file, then call ``spilled(chunk, ref)``."""

    chunk: Chunk


@dataclass(frozen=True, slots=True)
class WaitingForChannels:
    """Every device is complete, but channels ``missing`` never connected."""

    connected: int
    missing: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Commit:
    """Every device is complete and every channel connected: rename the outputs into
    place, then call ``committed`` (or ``commit_failed``)."""


@dataclass(frozen=True, slots=True)
class StatusChanged:
    """The QMP status changed (a log line, the MIGRATION event, the recorder)."""

    old: SessionStatus
    new: SessionStatus


@dataclass(frozen=True, slots=True)
class Finished:
    """The outcome is decided: stop listening, discard or keep the outputs."""

    outcome: Phase
    error: MultifdError | None


Command = (
    ProvideBuffer
    | PauseReading
    | ResumeReading
    | Accepted
    | AcceptedMain
    | CreateRamImages
    | WriteRam
    | Refuse
    | ResetConnection
    | CloseConnection
    | WakeLoader
    | WritePrecopy
    | StrayPrecopy
    | Spill
    | WaitingForChannels
    | MissingChannels  # the watchdog's warning: say it (it fails the migration if they never come)
    | Commit
    | StatusChanged
    | Finished
)
