"""--accept-timeout and --progress-timeout on the pure watchdog, with ``now`` pinned.

No sleeps: :meth:`Watchdog.check` is given a sample of the counters and the
time, and says whether the migration must end.
"""

from __future__ import annotations

import pytest

from vfio_multifd.core.watchdog import MissingChannels, Sample, Watchdog
from vfio_multifd.errors import Reason, SessionError

WAITING = ("device 0000:00:02.0/vfio idx 3",)


def sample(
    received: int = 0,
    written: int = 0,
    *,
    connected: frozenset[int] = frozenset({0, 1}),
    active: bool = True,
) -> Sample:
    return Sample(connected, received, written, active, WAITING)


def watchdog(
    *, progress: float | None = 10.0, accept: float | None = None, now: float = 1000.0
) -> Watchdog:
    return Watchdog(channels=2, accept_timeout=accept, progress_timeout=progress, now=now)


def test_progress_timeout_fires_after_the_timeout_without_a_change() -> None:
    dog = watchdog()
    assert dog.check(sample(100, 50), 1000.0) is None
    assert dog.check(sample(100, 50), 1010.0) is None  # exactly the timeout: not yet
    error = dog.check(sample(100, 50), 1010.001)
    assert error is not None and error.reason is Reason.PROGRESS_TIMEOUT
    assert str(error) == (f"no progress for 10 s (100 bytes received; waiting for {WAITING[0]})")


def test_progress_timeout_zero_never_fires() -> None:
    """--progress-timeout 0 reaches the watchdog as None (test_cli_options): never."""
    dog = watchdog(progress=None)
    assert dog.check(sample(100, 50), 1000.0) is None
    for now in (1010.001, 1e6, 1e12):
        assert dog.check(sample(100, 50), now) is None


@pytest.mark.parametrize("counter", ["written", "received"])
def test_each_write_or_receive_resets_the_timer(counter: str) -> None:
    """A loader that keeps writing (the network idle) is progress, and so is a channel
    that keeps receiving (the disk idle): the timer restarts at each change."""
    dog = watchdog()
    counters = {"received": 100, "written": 50}
    now = 1000.0
    assert dog.check(sample(**counters), now) is None
    for _ in range(5):
        now += 9.5  # under the timeout each time, 47.5 s in all
        counters[counter] += 1
        assert dog.check(sample(**counters), now) is None
    assert dog.check(sample(**counters), now + 10.0) is None
    error = dog.check(sample(**counters), now + 10.5)
    assert error is not None and error.reason is Reason.PROGRESS_TIMEOUT


def test_no_progress_is_expected_before_the_migration_is_active() -> None:
    """Waiting for the first channel (or after the end) is not a stall."""
    dog = watchdog()
    assert dog.check(sample(active=False), 1000.0) is None
    assert dog.check(sample(active=False), 5000.0) is None
    assert dog.check(sample(active=False), 1e12) is None


def test_accept_timeout_names_the_missing_channels() -> None:
    dog = watchdog(progress=None, accept=2.0)
    assert dog.check(sample(connected=frozenset({1})), 1002.0) is None
    error = dog.check(sample(connected=frozenset({1})), 1002.5)
    assert error is not None and error.reason is Reason.ACCEPT_TIMEOUT
    assert str(error) == "only 1 of 2 channels connected within 2 s (missing channel ids 0)"
    # Every channel in: the accept timeout no longer applies, however late.
    assert dog.check(sample(connected=frozenset({0, 1})), 9999.0) is None


def test_accept_timeout_zero_waits_for_ever() -> None:
    dog = watchdog(progress=None, accept=None)
    assert dog.check(sample(connected=frozenset()), 1e12) is None


# -- --missing-channels-grace -----------------------------------------------------------


def ended(connected: frozenset[int], *, reading: int = 0, handshaking: int = 0) -> Sample:
    """``connected`` channels, ``reading`` of them not ended; the counters never move."""
    return Sample(connected, 100, 50, True, WAITING, reading, handshaking)


def grace_dog(grace: float | None = 3.0) -> Watchdog:
    return Watchdog(
        channels=4, accept_timeout=None, progress_timeout=None, now=1000.0,
        missing_channels_grace=grace,
    )  # fmt: skip


def test_only_missing_channels_holding_the_migration_warns_once_then_fails_after_the_grace() -> None:
    dog = grace_dog()
    warning = dog.check(ended(frozenset({0, 1})), 1000.0)
    assert isinstance(warning, MissingChannels)
    assert (warning.missing, warning.channels, warning.grace) == ((2, 3), 4, 3.0)
    assert dog.check(ended(frozenset({0, 1})), 1003.0) is None  # exactly the grace: not yet
    error = dog.check(ended(frozenset({0, 1})), 1003.001)
    assert isinstance(error, SessionError) and error.reason is Reason.MISSING_CHANNELS
    assert "--channels 4" in str(error) and "channel ids 2, 3 never came" in str(error)


@pytest.mark.parametrize(
    "coming",
    [
        ended(frozenset({0, 1}), reading=1),  # a channel still sends: it may bring more
        ended(frozenset({0, 1}), handshaking=1),  # perhaps channel 2, handshaking
        ended(frozenset()),  # nothing connected yet: the source has not started
        ended(frozenset({0, 1, 2, 3})),  # all came
    ],
    ids=["reading", "handshaking", "none-connected", "all-connected"],
)
def test_no_warning_while_a_channel_may_still_come(coming: Sample) -> None:
    dog = grace_dog()
    for now in (1000.0, 1010.0, 1e6):
        assert dog.check(coming, now) is None


def test_a_channel_that_comes_restarts_the_grace_and_says_which_are_missing() -> None:
    dog = grace_dog()
    assert isinstance(dog.check(ended(frozenset({0})), 1000.0), MissingChannels)
    assert dog.check(ended(frozenset({0, 1}), reading=1), 1002.0) is None
    warning = dog.check(ended(frozenset({0, 1})), 1002.5)
    assert isinstance(warning, MissingChannels) and warning.missing == (2, 3)
    assert dog.check(ended(frozenset({0, 1})), 1005.4) is None  # 2.9 s of the new grace
    assert isinstance(dog.check(ended(frozenset({0, 1})), 1005.6), SessionError)


def test_grace_zero_leaves_it_to_the_timeouts() -> None:
    """--missing-channels-grace 0 reaches the watchdog as None."""
    dog = grace_dog(None)
    for now in (1000.0, 1e6):
        assert dog.check(ended(frozenset({0, 1})), now) is None
