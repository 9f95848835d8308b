"""The command line's options, in-process: what each accepts, what it refuses and
with which message, what it becomes. No socket is opened: every case here is
decided while parsing."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from vfio_multifd.cli import build_parser, main, receive_settings
from vfio_multifd.config import (
    DEFAULT_MAX_QUEUED_BYTES,
    Address,
    DeviceSpec,
    Digest,
    QueueFullPolicy,
    ReceiveSettings,
)
from vfio_multifd.errors import UsageError
from vfio_multifd.source.plan import SourceDevice
from vfio_multifd.source.sender import send


def base_args(command: str, tmp_path: Path) -> list[str]:
    """The least each subcommand needs (nothing is opened while parsing)."""
    if command == "receive":
        return ["receive", "--device", f"idstr=a,data={tmp_path / 'a.bin'}"]
    if command == "send":
        return ["send", "--connect", "tcp:127.0.0.1:9", "--device", "idstr=a,size=1M"]
    return ["status", "--socket", str(tmp_path / "s.sock")]


def parse(command: str, tmp_path: Path, *options: str) -> argparse.Namespace:
    return build_parser().parse_args([*base_args(command, tmp_path), *options])


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``main(argv)``, which must be a usage error: exit 2, one line, nothing on
    stdout. Returns that line."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vfio-multifd: error: ")
    return lines[0]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


# -- seconds -------------------------------------------------------------------------

#: (subcommand, option, what 0 means: None for "disabled", or "refused")
SECONDS_OPTIONS = [
    ("receive", "--accept-timeout", None),
    ("receive", "--handshake-timeout", "refused"),
    ("receive", "--progress-timeout", None),
    ("receive", "--progress-interval", None),
    ("send", "--progress-interval", None),
    ("send", "--connect-timeout", "refused"),
    ("status", "--timeout", "refused"),
]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_handshake_timeout_zero_is_a_usage_error_not_ten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    line = usage_error(capsys, [*base_args("receive", tmp_path), "--handshake-timeout", value])
    assert line == (
        "vfio-multifd: error: argument --handshake-timeout: "
        f"must be a finite number of seconds above 0, not {value!r}"
    )


@pytest.mark.parametrize("value", ["-1", "-0.5", "nan", "inf", "-inf", "soon"])
@pytest.mark.parametrize(("command", "option", "zero"), SECONDS_OPTIONS)
def test_bad_seconds_are_usage_errors_naming_the_option(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    option: str,
    zero: str | None,
    value: str,
) -> None:
    # --option=VALUE: argparse would take a separate "-inf" for an option.
    line = usage_error(capsys, [*base_args(command, tmp_path), f"{option}={value}"])
    assert f"argument {option}: " in line
    assert repr(value) in line


@pytest.mark.parametrize(("command", "option", "zero"), SECONDS_OPTIONS)
def test_zero_seconds_disables_or_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, option: str, zero: str | None
) -> None:
    argv = [*base_args(command, tmp_path), option, "0"]
    if zero == "refused":
        assert f"argument {option}: " in usage_error(capsys, argv)
    else:
        args = build_parser().parse_args(argv)
        assert getattr(args, option[2:].replace("-", "_")) is None


@pytest.mark.parametrize(("command", "option", "zero"), SECONDS_OPTIONS)
def test_positive_seconds_are_taken_as_given(
    tmp_path: Path, command: str, option: str, zero: str | None
) -> None:
    args = parse(command, tmp_path, option, "0.25")
    assert getattr(args, option[2:].replace("-", "_")) == 0.25


def test_zero_timeouts_reach_the_settings_as_disabled(tmp_path: Path) -> None:
    args = parse("receive", tmp_path, "--progress-timeout", "0", "--accept-timeout", "0")
    settings = receive_settings(args)
    assert settings.progress_timeout is None
    assert settings.accept_timeout is None


# -- --channels: one check, one message ---------------------------------------------


@pytest.mark.parametrize("channels", [0, 257, -1])
def test_channels_out_of_range_is_one_message_for_receive_and_send(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], channels: int
) -> None:
    expected = f"vfio-multifd: error: --channels must be 1..256 (a one-byte id), not {channels}"
    for command in ("receive", "send"):
        argv = [*base_args(command, tmp_path), "--channels", str(channels)]
        assert usage_error(capsys, argv) == expected


def test_the_library_checks_channels_with_the_same_message(tmp_path: Path) -> None:
    message = "--channels must be 1..256 (a one-byte id), not 257"
    device = DeviceSpec.parse(f"idstr=a,data={tmp_path / 'a.bin'}")
    with pytest.raises(UsageError) as received:
        ReceiveSettings(devices=(device,), channels=257)
    with pytest.raises(UsageError) as sent:
        send(Address.parse("tcp:127.0.0.1:9"), [SourceDevice.parse("idstr=a,size=1")], channels=257)
    assert str(received.value) == str(sent.value) == message


@pytest.mark.parametrize("command", ["receive", "send"])
def test_channels_bounds_and_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert parse(command, tmp_path, "--channels", "1").channels == 1
    assert parse(command, tmp_path, "--channels", "256").channels == 256
    line = usage_error(capsys, [*base_args(command, tmp_path), "--channels", "two"])
    assert line == "vfio-multifd: error: argument --channels: not a whole number: 'two'"


# -- conversions, once, by argparse -------------------------------------------------


def test_receive_options_arrive_converted(tmp_path: Path) -> None:
    args = parse(
        "receive",
        tmp_path,
        "--digest",
        "sha256",
        "--on-queue-full",
        "fail",
        "--spill-dir",
        str(tmp_path),
        "--listen",
        "unix:/run/x.sock",
        "--uuid",
        "12345678-1234-5678-1234-567812345678",
        "--max-queued-bytes",
        "0",
    )
    assert args.digest is Digest.SHA256
    assert args.on_queue_full is QueueFullPolicy.FAIL
    assert args.spill_dir == tmp_path and isinstance(args.spill_dir, Path)
    assert args.listen == Address("unix", path="/run/x.sock")
    assert args.uuid == bytes.fromhex("12345678123456781234567812345678")
    assert args.max_queued_bytes is None  # 0: no bound
    assert args.device == [DeviceSpec.parse(f"idstr=a,data={tmp_path / 'a.bin'}")]


def test_receive_defaults_are_the_library_defaults(tmp_path: Path) -> None:
    args = parse("receive", tmp_path)
    settings = receive_settings(args)
    assert settings == ReceiveSettings(
        devices=(DeviceSpec.parse(f"idstr=a,data={tmp_path / 'a.bin'}"),)
    )
    assert settings.max_queued_bytes == DEFAULT_MAX_QUEUED_BYTES
    assert settings.handshake_timeout == 10.0
    assert args.progress_interval == 5.0


def test_send_options_arrive_converted(tmp_path: Path) -> None:
    args = parse("send", tmp_path, "--digest", "sha256", "--channels", "3")
    assert args.digest is Digest.SHA256
    assert args.connect == Address("tcp", "127.0.0.1", 9)
    assert args.device == [SourceDevice.parse("idstr=a,size=1M")]
    assert (args.channels, args.uuid, args.connect_timeout) == (3, bytes(16), 30.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--digest", "md5"], "argument --digest: invalid choice: 'md5' (choose from "),
        (["--on-queue-full", "drop"], "argument --on-queue-full: invalid choice: 'drop'"),
        (["--uuid", "nope"], "argument --uuid: not a UUID: 'nope'"),
        (["--listen", "udp:1"], "argument --listen: not an address: 'udp:1'"),
        (["--max-packet-size", "1Q"], "argument --max-packet-size: not a size: '1Q'"),
    ],
)
def test_conversion_errors_name_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    line = usage_error(capsys, [*base_args("receive", tmp_path), *argv])
    assert line.startswith(f"vfio-multifd: error: {message}")


# -- the options as a contract: spelled as before, each with a help line ----------

#: Every option each subcommand had before the reshape; scripts use them.
OPTIONS_BEFORE = {
    "receive": {
        "--listen", "--channels", "--uuid", "--device", "--max-packet-size",
        "--max-queued-bytes", "--on-queue-full", "--spill-dir", "--accept-timeout",
        "--handshake-timeout", "--progress-timeout", "--digest", "--no-fsync",
        "--status-socket", "--ready-fd", "--progress-interval", "--log-format", "--log-level",
    },
    "send": {
        "--connect", "--channels", "--uuid", "--device", "--chunk-size", "--order", "--seed",
        "--digest", "--inject", "--connect-timeout", "--progress-interval", "--log-format",
        "--log-level",
    },
    "status": {"--socket", "--json", "--timeout", "--watch"},
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(OPTIONS_BEFORE))
def test_every_option_is_still_spelled_as_before(command: str) -> None:
    options = {s for a in subparsers()[command]._actions for s in a.option_strings}
    assert OPTIONS_BEFORE[command] <= options


def test_every_option_of_every_subcommand_has_a_help_line() -> None:
    parsers = {"vfio-multifd": build_parser(), **subparsers()}
    for name, parser in parsers.items():
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
            assert "\n" not in action.help


@pytest.mark.parametrize("command", ["receive", "send"])
def test_help_shows_enum_choices_as_values(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # help wraps lines
    assert "--digest {xxh3-128,sha256,none}" in out
    if command == "receive":
        assert "--on-queue-full {spill,fail}" in out
    assert "Digest." not in out and "QueueFullPolicy." not in out


def test_send_log_level_help_does_not_name_receiver_events() -> None:
    (level,) = (a for a in subparsers()["send"]._actions if a.dest == "log_level")
    assert level.help is not None and "buffer_incoming" not in level.help


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--max-packet-size", "0"], "--max-packet-size 0 is below 12"),
        (["--max-packet-size", "11"], "--max-packet-size 11 is below 12"),
        (
            ["--max-queued-bytes", "2M"],
            "--max-queued-bytes 2097152 is too small for --max-packet-size 1048588: "
            "the smallest bound that works is 2105600 (a reserve for the chunk a loader needs "
            "next, and a buffer to spill from, each as large as the largest chunk); give "
            "--max-queued-bytes 3MiB or more",
        ),
        (
            ["--max-queued-bytes", "1M", "--max-packet-size", "4M"],
            "the smallest bound that works is 8397056 (a reserve",
        ),
        (
            ["--max-queued-bytes", "4M", "--max-packet-size", "4M", "--on-queue-full", "fail"],
            "the smallest bound that works is 4198656 (the largest chunk and its bookkeeping); "
            "give --max-queued-bytes 5MiB or more",
        ),
    ],
)
def test_sizes_that_could_never_complete_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], expected: str
) -> None:
    """Issue 10 items 4 and 5: each connection failed, or the migration stalled."""
    code = main(["receive", *options, "--device", f"idstr=a,data={tmp_path / 'a.bin'}"])
    assert code == 2
    assert expected in capsys.readouterr().err


# -- --event-loop ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["receive", "send"])
def test_event_loop_defaults_to_uvloop_and_takes_asyncio(tmp_path: Path, command: str) -> None:
    from vfio_multifd.cli.options import EventLoop

    assert parse(command, tmp_path).event_loop is EventLoop.UVLOOP
    assert parse(command, tmp_path, "--event-loop", "asyncio").event_loop is EventLoop.ASYNCIO


def test_event_loop_other_than_the_two_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = usage_error(capsys, [*base_args("receive", tmp_path), "--event-loop", "tokio"])
    assert line.startswith("vfio-multifd: error: argument --event-loop: invalid choice: 'tokio'")


@pytest.mark.parametrize("name", ["uvloop", "asyncio"])
def test_run_loop_runs_the_loop_it_is_given(name: str) -> None:
    import asyncio

    import uvloop

    from vfio_multifd.cli import run_loop
    from vfio_multifd.cli.options import EventLoop

    async def which() -> type:
        return type(asyncio.get_running_loop())

    loop_type = run_loop(which(), EventLoop(name))
    assert issubclass(loop_type, uvloop.Loop) == (name == "uvloop")


# -- options spelled in full ----------------------------------------------------------


@pytest.mark.parametrize("command", ["receive", "send"])
def test_an_abbreviated_option_is_refused_naming_the_whole_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """argparse took --chan 4 for --channels 4: a script would break once another
    --chan... option came."""
    for argv in (["--chan", "4"], ["--chan=4"]):
        line = usage_error(capsys, [*base_args(command, tmp_path), *argv])
        assert line == (
            "vfio-multifd: error: unrecognized option '--chan' (did you mean --channels?)"
        )


def test_a_misspelled_required_option_is_named_before_the_missing_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It was answered "the following arguments are required: --connect"."""
    line = usage_error(capsys, ["send", "--conect", "tcp:127.0.0.1:9", "--device", "idstr=a,size=1"])
    assert line == "vfio-multifd: error: unrecognized option '--conect' (did you mean --connect?)"
    line = usage_error(capsys, ["--verison"])
    assert line == "vfio-multifd: error: unrecognized option '--verison' (did you mean --version?)"
    line = usage_error(capsys, ["receive", "--zzz", "1"])
    assert line == "vfio-multifd: error: unrecognized option '--zzz' (see --help)"


def test_no_parser_takes_any_option_abbreviated(tmp_path: Path) -> None:
    """Every long option of every subcommand, less its last letter, is refused (unless
    that is an option of its own), and the refusal suggests it."""
    parsers = {"vfio-multifd": build_parser(), **subparsers()}
    checked = 0
    for name, parser in parsers.items():
        assert not parser.allow_abbrev, name
        options = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
        for option in sorted(options):
            prefix = option[:-1]
            if prefix in options or prefix == "-":
                continue
            with pytest.raises(UsageError, match="unrecognized option") as refused:
                parser.parse_args([prefix, "1"])
            assert option in str(refused.value), (name, option)
            checked += 1
    assert checked > 60


@pytest.mark.parametrize("bound", ["3M", "4M", "8M", "64M"])
def test_round_bounds_work_with_the_default_packet_size(tmp_path: Path, bound: str) -> None:
    """--max-queued-bytes 8M was refused by 256 bytes with the default --max-packet-size 4M."""
    settings = receive_settings(parse("receive", tmp_path, "--max-queued-bytes", bound))
    assert settings.max_queued_bytes == int(bound[:-1]) << 20


def test_the_defaults_fit_qemu_and_our_sender() -> None:
    """QEMU's largest device-state packet is a 1 MiB chunk and its 12-byte VFIO header:
    the default --max-packet-size takes it, and our sender's default chunk size makes it."""
    from vfio_multifd.core.wire import DEFAULT_MAX_PACKET_SIZE, VFIO_HEADER
    from vfio_multifd.source.plan import DEFAULT_CHUNK_SIZE

    assert DEFAULT_MAX_PACKET_SIZE == (1 << 20) + 12 == DEFAULT_CHUNK_SIZE + VFIO_HEADER.size


# -- sizes: decimal and binary suffixes --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096), ("4096B", 4096),
        ("64K", 64 << 10), ("64KiB", 64 << 10), ("64k", 64 << 10), ("64KB", 64_000),
        ("64M", 64 << 20), ("64MiB", 64 << 20), ("64mib", 64 << 20), ("64MB", 64_000_000),
        ("2G", 2 << 30), ("2GiB", 2 << 30), ("2GB", 2_000_000_000),
        ("1T", 1 << 40), ("1TB", 10**12),
    ],
)  # fmt: skip
def test_a_size_is_binary_unless_it_says_decimal(tmp_path: Path, text: str, size: int) -> None:
    """--max-queued-bytes 64MB was read as 64 MiB: MB is 10^6 bytes, MiB (and M, as QEMU
    reads it) 2^20."""
    assert parse("receive", tmp_path, "--max-spill-bytes", text).max_spill_bytes == size


@pytest.mark.parametrize("text", ["1Mi", "1.5M", "M", "1 M B", "1KiBs", "-1"])
def test_a_size_in_no_known_unit_is_refused_saying_which_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    line = usage_error(capsys, [*base_args("receive", tmp_path), f"--max-spill-bytes={text}"])
    assert line == (
        f"vfio-multifd: error: argument --max-spill-bytes: not a size: {text!r} (expected e.g. "
        "4096, 64K or 64KiB, 1M or 1MiB, 2G; 1MB is 1000000 bytes)"
    )
