"""Shared fixtures: every async test runs under both the stdlib loop and uvloop,
and a test fails if anything reached the loop's exception handler (as uvloop's
own suite does): an exception nobody awaited is a bug, not noise."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))  # test_benchmark_smoke

import cli_helpers
from cli_helpers import Daemon
from helpers import reset_logging

_loop_errors: list[dict[str, Any]] = []


def _record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    _loop_errors.append(context)
    loop.default_exception_handler(context)


def _factory(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> Callable[[], asyncio.AbstractEventLoop]:
    def make() -> asyncio.AbstractEventLoop:
        loop = new_loop()
        loop.set_exception_handler(_record)
        return loop

    return make


def pytest_asyncio_loop_factories(
    config: Any, item: Any
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": _factory(asyncio.new_event_loop), "uvloop": _factory(uvloop.new_event_loop)}


@pytest.fixture(autouse=True)
def no_unhandled_loop_errors() -> Iterator[None]:
    _loop_errors.clear()
    yield
    errors = list(_loop_errors)
    _loop_errors.clear()
    assert not errors, f"the event loop's exception handler was called: {errors}"


@pytest.fixture(params=["uvloop", "asyncio"])
def cli_loop(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test once per ``--event-loop``: every ``receive`` and ``send`` the
    helpers in cli_helpers start (``Daemon``, ``run``) gets it."""
    cli_helpers.EVENT_LOOP = request.param
    try:
        yield request.param
    finally:
        cli_helpers.EVENT_LOOP = "uvloop"


@pytest.fixture
def daemons(cli_loop: str) -> Iterator[list[Daemon]]:
    """Daemons started by a test (under each event loop); killed afterwards if still running."""
    yield from _killed_afterwards()


@pytest.fixture
def one_loop_daemons() -> Iterator[list[Daemon]]:
    """As ``daemons``, for a test whose promise the event loop plays no part in (how an
    option is read, what a summary says, a file's mode): under the default loop only."""
    yield from _killed_afterwards()


def _killed_afterwards() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For a test that configures logging (as ``main`` does): the defaults afterwards."""
    yield
    reset_logging()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: a unix socket path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="vfio-t-") as directory:
        yield Path(directory)
