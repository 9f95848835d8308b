"""What every subcommand shares: the exit codes, the event loop, the log configuration."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from .. import logconfig
from ..errors import UsageError
from . import options as cli_options

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_VERDICT = 3  # replay: the daemon neither closed nor reset the channels in time

T = TypeVar("T")


def run_loop(
    main: Coroutine[Any, Any, T], event_loop: cli_options.EventLoop = cli_options.EventLoop.UVLOOP
) -> T:
    """Run ``main`` to the end on ``event_loop``: the one place the event loop is chosen."""
    if event_loop is cli_options.EventLoop.ASYNCIO:
        return asyncio.run(main)
    try:
        import uvloop
    except ImportError as error:
        main.close()
        raise UsageError(
            f"--event-loop uvloop: cannot import uvloop ({error}); --event-loop asyncio needs nothing"
        ) from None
    return uvloop.run(main)


def configure_logging(args: argparse.Namespace) -> None:
    logconfig.configure(log_format=args.log_format, level=args.log_level)
