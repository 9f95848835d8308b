"""The watchdog: --accept-timeout, --progress-timeout and --missing-channels-grace.

Pure: :meth:`Watchdog.check` takes a sample of the migration's counters and
``now`` and returns the error that should end the migration, or a
:class:`MissingChannels` warning, if any. The migration core samples it every
:data:`PERIOD` seconds of the time it is given.
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
    reading: int = 0  # accepted channels that have not ended yet
    handshaking: int = 0  # connections whose handshake is not complete yet


@dataclass(frozen=True, slots=True)
class MissingChannels:
    """Every channel that connected has ended, and only channels that never came hold
    the migration: most likely the source uses fewer channels than ``--channels``."""

    channels: int  # --channels
    missing: tuple[int, ...]  # the ids that never connected
    grace: float  # seconds until the migration fails, unless they come

    @property
    def text(self) -> str:
        return (
            f"every channel that connected has ended, and channel ids "
            f"{', '.join(map(str, self.missing))} never came: does the source use "
            f"--channels {self.channels} (QEMU's multifd-channels) too?"
        )


class Watchdog:
    def __init__(
        self,
        *,
        channels: int,
        accept_timeout: float | None,
        progress_timeout: float | None,
        now: float,
        missing_channels_grace: float | None = None,
    ) -> None:
        self.channels = channels
        self.accept_timeout = accept_timeout
        self.progress_timeout = progress_timeout
        self.missing_channels_grace = missing_channels_grace
        # Since when only the channels that never came hold the migration, and which.
        self._held_since: float | None = None
        self._held_by: tuple[int, ...] = ()
        self.opened = now
        self._last: tuple[int, int] | None = None  # received, written
        self._last_change = now

    def check(self, sample: Sample, now: float) -> SessionError | MissingChannels | None:
        held = self._held_by_missing_channels(sample, now)
        if held is not None:
            return held
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

    def _held_by_missing_channels(
        self, sample: Sample, now: float
    ) -> SessionError | MissingChannels | None:
        """Warn once when only channels that never connected hold the migration, and
        fail ``missing_channels_grace`` seconds later unless one comes meanwhile."""
        grace = self.missing_channels_grace
        connected = len(sample.connected)
        coming = sample.reading or sample.handshaking  # a channel may still come
        if grace is None or coming or not 0 < connected < self.channels:
            self._held_since = None
            return None
        missing = tuple(sorted(set(range(self.channels)) - sample.connected))
        if self._held_since is None or missing != self._held_by:
            self._held_since, self._held_by = now, missing
            return MissingChannels(self.channels, missing, grace)
        if now - self._held_since <= grace:
            return None
        return SessionError(
            Reason.MISSING_CHANNELS,
            f"only {connected} of {self.channels} channels connected, and they ended "
            f"{grace:g} s ago (--missing-channels-grace): "
            f"{MissingChannels(self.channels, missing, grace).text}",
        )
