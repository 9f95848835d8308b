"""The option types of the command line: each converts and checks its option, once.

A type that fails raises :class:`UsageError`; :func:`_option_type` hands its
message to argparse, which puts the option's name before it. The names keep
their underscore: argparse names a type in some of its messages.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import functools
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from ..config import Address, DeviceSpec, check_channels, is_number, parse_size, parse_uuid
from ..errors import UsageError
from ..source.plan import SourceDevice

T = TypeVar("T")
E = TypeVar("E", bound=enum.StrEnum)


class _Parser(argparse.ArgumentParser):
    """A usage error goes through :func:`main` like any other: one line, exit 2.

    Options are spelled in full: argparse's abbreviations would make ``--chan 4``
    mean ``--channels 4`` today and an error once another ``--chan...`` option is
    added, so scripts could break with no change of theirs. A misspelled option
    is named, with the options it may have meant, before anything else is checked.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        arguments = list(sys.argv[1:] if args is None else args)
        self._check_option_names(arguments)
        return super().parse_known_args(arguments, namespace)

    def _check_option_names(self, arguments: list[str]) -> None:
        """Refuse a ``--name`` this parser does not know, suggesting the closest ones.

        Without this, ``send --conect ADDR`` is answered "the following arguments
        are required: --connect", which hides the typo. A parser with subcommands
        looks only at what comes before the subcommand (the rest is its own)."""
        has_subcommands = self._subparsers is not None
        known = sorted(name for name in self._option_string_actions if name.startswith("--"))
        for argument in arguments:
            if argument == "--":
                return
            if has_subcommands and not argument.startswith("-"):
                return
            name = argument.partition("=")[0]
            if not name.startswith("--") or name in self._option_string_actions:
                continue
            self.error(f"unrecognized option {name!r}{_did_you_mean(name, known)}")

    def error(self, message: str) -> NoReturn:
        # "argument --channels: --channels must be 1..256 ...": a message shared
        # with the library already names its option; say it once.
        prefix, _, rest = message.partition(": ")
        if prefix.startswith("argument ") and rest.startswith(prefix.split()[-1] + " "):
            message = rest
        raise UsageError(message)


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    """`` (did you mean --channels?)``: the options ``name`` starts, else the closest."""
    guesses = [option for option in known if option.startswith(name)]
    guesses = guesses or difflib.get_close_matches(name, known, n=1)
    if not guesses:
        return " (see --help)"
    return f" (did you mean {' or '.join(guesses)}?)"


def _option_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type`` from a function that raises :class:`UsageError`:
    its message is kept, and argparse puts the option's name before it."""

    @functools.wraps(parse)
    def convert(text: str) -> T:
        try:
            return parse(text)
        except UsageError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


_size = _option_type(parse_size)
_uuid = _option_type(parse_uuid)
_address = _option_type(Address.parse)
_receive_device = _option_type(DeviceSpec.parse)


def _ram_target(text: str) -> Path | str:
    """``--ram``: a directory, or ``discard``."""
    return "discard" if text == "discard" else Path(text)


@_option_type
def _metrics_address(text: str) -> Address:
    """``tcp:HOST:PORT`` only (port 0 picks a free one)."""
    address = Address.parse(text)
    if address.kind != "tcp":
        raise UsageError(f"not a TCP address: {text!r} (expected tcp:HOST:PORT)")
    return address


_send_device = _option_type(SourceDevice.parse)


@_option_type
def _channels(text: str) -> int:
    try:
        channels = int(text)
    except ValueError:
        raise UsageError(f"not a whole number: {text!r}") from None
    return check_channels(channels)


@_option_type
def _ready_fd(text: str) -> int:
    """A descriptor the daemon inherited, not 0-2: once closed, the next socket would
    take its number, and a channel on 1 would get the summary meant for stdout."""
    if not is_number(text) or int(text) > 0x7FFFFFFF:
        raise UsageError(f"not a file descriptor number: {text!r}")
    fd = int(text)
    if fd <= 2:
        raise UsageError(
            f"{fd} is standard {('input', 'output', 'error')[fd]}; pass a descriptor of its own"
        )
    return fd


@_option_type
def _count(text: str) -> int:
    """A whole number, 1 or more."""
    if not is_number(text) or int(text) < 1:
        raise UsageError(f"must be a whole number of 1 or more, not {text!r}")
    return int(text)


@_option_type
def _zero_or_more(text: str) -> int:
    """A whole number, 0 or more."""
    if not is_number(text):
        raise UsageError(f"must be a whole number of 0 or more, not {text!r}")
    return int(text)


@_option_type
def _queue_bound(text: str) -> int | None:
    """A size; 0 is no bound (None)."""
    return parse_size(text) or None


def _one_of(kind: type[E]) -> dict[str, Any]:
    """``type`` and ``choices`` of an enum option: argparse gives the member
    named by its value (``--digest sha256``), and help shows the values."""

    def parse(text: str) -> E:
        try:
            return kind(text)
        except ValueError:
            choices = ", ".join(repr(member.value) for member in kind)
            raise UsageError(f"invalid choice: {text!r} (choose from {choices})") from None

    return {"type": _option_type(parse), "choices": list(kind)}


def _seconds(text: str, *, zero_disables: bool) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise UsageError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero_disables):
        allowed = "0 (disabled) or a finite number" if zero_disables else "a finite number"
        raise UsageError(f"must be {allowed} of seconds above 0, not {text!r}")
    return seconds


@_option_type
def _positive_seconds(text: str) -> float:
    return _seconds(text, zero_disables=False)


@_option_type
def _seconds_or_off(text: str) -> float | None:
    """0 disables (None)."""
    return _seconds(text, zero_disables=True) or None


# -- the parser: one function per subcommand, shared options in parents -----------
