"""The explicit states of a migration and of each of its connections."""

from __future__ import annotations

import enum

from ..results import SessionStatus


class Phase(enum.Enum):
    """Where the migration is. The first error (or cancel) moves it to FAILED or
    CANCELLED, and nothing moves it again; COMMITTING ignores errors and cancels,
    since every device is complete and the files are being renamed into place."""

    SETUP = "setup"  # listening, no channel accepted yet
    ACTIVE = "active"  # channels accepted, devices loading
    COMMITTING = "committing"  # every device complete, every channel connected
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def running(self) -> bool:
        """Errors and cancels still decide the outcome."""
        return self in (Phase.SETUP, Phase.ACTIVE)

    @property
    def ended(self) -> bool:
        return self in (Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED)

    def status(self, *, stopped: bool) -> SessionStatus:
        """QMP's name for this phase; ``stopped``: the driver has cleaned up, so a
        cancel that was ``cancelling`` is now ``cancelled``."""
        if self is Phase.CANCELLED:
            return SessionStatus.CANCELLED if stopped else SessionStatus.CANCELLING
        return _STATUS[self]


_STATUS = {
    Phase.SETUP: SessionStatus.SETUP,
    Phase.ACTIVE: SessionStatus.ACTIVE,
    Phase.COMMITTING: SessionStatus.ACTIVE,  # QMP has no name for it: still active
    Phase.COMPLETED: SessionStatus.COMPLETED,
    Phase.FAILED: SessionStatus.FAILED,
}


class ChannelState(enum.Enum):
    HANDSHAKE = "handshake"
    ACTIVE = "active"
    CLOSED = "closed"  # clean end of stream
    REFUSED = "refused"  # failed the handshake
    FAILED = "failed"
