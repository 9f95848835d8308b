"""The memory policy: what to do with a packet when memory is at --max-queued-bytes.

Pure, in the manner of aioquic's connection object: given the reassembly
buffer's state, the arriving packet and ``now``, :meth:`MemoryPolicy.admit`
returns a decision and changes nothing but its own bookkeeping. It never
waits and never touches a file; the migration core (``core/migration.py``, with
its ``core/ledger.py``) carries the decisions out.

Why the decisions cannot deadlock: a channel is told to :class:`Wait` without
a deadline only while some memory is *drainable* (being written by a loader,
being spilled, or ready for a loader to take), and each of those frees memory
with no further input from any channel. It is told to wait for other
channels to bring a device's next chunk only for ``grace`` seconds, once per
stall, and only while another channel is still reading. Otherwise a chunk
goes to disk (:class:`SpillIncoming`, :class:`SpillVictim`), which needs no
input either.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SessionError
from .reassembly import Chunk, ReassemblyBuffer
from .wire import DevicePacket, PacketHeader

#: How long a channel whose early chunk finds memory full waits for another
#: channel to bring the chunk a loader needs, before it spills (once per stall).
SPILL_GRACE = 0.025


@dataclass(frozen=True, slots=True)
class Insert:
    """The packet fits: queue it in memory."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait until memory changes, or until ``deadline`` (``now``'s clock) if it is set."""

    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class SpillIncoming:
    """Write the arriving chunk straight to the spill file: it is needed last."""


@dataclass(frozen=True, slots=True)
class SpillVictim:
    """Move ``chunk``, needed later than the arriving one, from memory to the spill file."""

    chunk: Chunk


@dataclass(frozen=True, slots=True)
class Fail:
    """QEMU's policy: a queue over the bound ends the migration."""

    error: SessionError


Decision = Insert | Wait | SpillIncoming | SpillVictim | Fail

INSERT = Insert()
WAIT = Wait()
SPILL_INCOMING = SpillIncoming()


class MemoryPolicy:
    def __init__(
        self, reassembly: ReassemblyBuffer, *, fail_when_full: bool, grace: float = SPILL_GRACE
    ) -> None:
        self.reassembly = reassembly
        self.fail_when_full = fail_when_full
        self.grace = grace
        # Bytes the loaders had written when a grace last expired in vain: no
        # second grace until they write more (a stall is waited out once).
        self._grace_expired_at_written = -1

    def admit(
        self,
        packet: PacketHeader | DevicePacket,
        *,
        now: float,
        others_reading: int,
        channel: int | None = None,
        announced: bool = False,
    ) -> Decision:
        """Where ``packet``'s chunk goes. ``others_reading``: channels besides the
        arriving one (``channel``, whose header reserved its idx) that are reading and
        not themselves waiting for memory.

        Raises :class:`ProtocolError` for a chunk that may not be queued at all,
        before anything is spilled for it (``announced``: its header's reservation
        checked it already).
        """
        reassembly = self.reassembly
        device = reassembly.device(packet.device, packet.idx)
        ahead = packet.idx != device.next_idx
        if reassembly.fits(packet.size, ahead=ahead):
            return INSERT
        if not announced:
            device.check(packet.idx, packet.config, channel)
        if self.fail_when_full:
            return Fail(reassembly.queue_full_error(packet))
        if reassembly.drainable() or reassembly.spilling_bytes:
            return WAIT
        if (
            ahead
            and others_reading > 0
            and self._grace_expired_at_written != reassembly.bytes_written
        ):
            # Memory holds only chunks that arrived early. When channels are
            # merely skewed, another one brings the next chunk within
            # milliseconds (into the reserve), and waiting beats spilling.
            return Wait(now + self.grace)
        victim = reassembly.spill_victim()
        distance = reassembly.distance(packet.device, packet.idx)
        if distance > 0 and (
            victim is None or distance >= reassembly.distance(victim.device, victim.idx)
        ):
            return SPILL_INCOMING
        if victim is None:
            # Only the device's next chunk is left to place and every byte in
            # memory is on its way out: wait for it.
            return WAIT
        return SpillVictim(victim)

    def wait_expired(self) -> None:
        """A :class:`Wait` with a deadline ran out with nothing changed."""
        self._grace_expired_at_written = self.reassembly.bytes_written
