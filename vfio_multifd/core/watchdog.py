"""The watchdog: --accept-timeout and --progress-timeout.

Pure: :meth:`Watchdog.check` takes a sample of the migration's counters and
``now`` and returns the error that should end the migration, if any. The
migration core samples it every :data:`PERIOD` seconds of the time it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Reason, SessionError

#: How often the core samples it.
PERIOD = 0.25


@dataclass(frozen=True, slots=True)
class Sample:
    connected: frozenset[int]  # ids of the accepted channels
    received: int  # bytes received on them
    written: int  # data bytes written by the loaders
    active: bool  # the migration is active (progress is expected)
    waiting_for: tuple[str, ...]  # "device D idx N" (or its writes) the loaders wait for


class Watchdog:
    def __init__(
        self,
        *,
        channels: int,
        accept_timeout: float | None,
        progress_timeout: float | None,
        now: float,
    ) -> None:
        self.channels = channels
        self.accept_timeout = accept_timeout
        self.progress_timeout = progress_timeout
        self.opened = now
        self._last: tuple[int, int] | None = None  # received, written
        self._last_change = now

    def check(self, sample: Sample, now: float) -> SessionError | None:
        if (
            self.accept_timeout is not None
            and len(sample.connected) < self.channels
            and now - self.opened > self.accept_timeout
        ):
            missing = sorted(set(range(self.channels)) - sample.connected)
            return SessionError(
                Reason.ACCEPT_TIMEOUT,
                f"only {len(sample.connected)} of {self.channels} channels "
                f"connected within {self.accept_timeout:g} s "
                f"(missing channel ids {', '.join(map(str, missing))})",
            )
        counters = (sample.received, sample.written)
        if counters != self._last:
            self._last, self._last_change = counters, now
            return None
        if (
            self.progress_timeout is not None
            and sample.active
            and now - self._last_change > self.progress_timeout
        ):
            return SessionError(
                Reason.PROGRESS_TIMEOUT,
                f"no progress for {self.progress_timeout:g} s ({sample.received} bytes received; "
                f"waiting for {'; '.join(sample.waiting_for)})",
            )
        return None
