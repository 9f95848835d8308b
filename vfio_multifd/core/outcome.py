"""How a migration ends: its phase, the first error, and every change of status.

Part of the migration core (pure). The first error (or cancel) decides;
nothing after it changes the outcome. Each change of the QMP status is
emitted as a :class:`~.commands.StatusChanged`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import Cancelled, MultifdError
from ..results import SessionStatus
from .commands import Command, StatusChanged
from .state import Phase


class Outcome:
    def __init__(self, emit: Callable[[Command], None]) -> None:
        self._emit = emit
        self.phase = Phase.SETUP
        self.error: MultifdError | None = None
        self.stopped = False  # the driver has cleaned up after the outcome
        self.started: float | None = None  # the first channel accepted
        self.finished: float | None = None  # the status became final

    @property
    def status(self) -> SessionStatus:
        return self.phase.status(stopped=self.stopped)

    def start(self, now: float) -> None:
        """The first channel was accepted."""
        if self.started is None:
            self.started = now
            self.set_phase(Phase.ACTIVE, now)

    def decide(self, error: MultifdError, now: float) -> None:
        """End with ``error`` (the caller knows it is the first)."""
        self.error = error
        self.set_phase(Phase.CANCELLED if isinstance(error, Cancelled) else Phase.FAILED, now)

    def stop(self, now: float) -> bool:
        """The driver has cleaned up: a cancel is now ``cancelled``. True the first time."""
        if not self.phase.ended or self.stopped:
            return False
        old = self.status
        self.stopped = True
        self._changed(old, now)
        return True

    def set_phase(self, phase: Phase, now: float) -> None:
        old = self.status
        self.phase = phase
        self._changed(old, now)

    def _changed(self, old: SessionStatus, now: float) -> None:
        new = self.status
        if new is not old:
            if new.final:
                self.finished = now
            self._emit(StatusChanged(old, new))
