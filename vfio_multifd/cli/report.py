"""What the subcommands print when they end: the summaries and the replay's plan."""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

from ..config import Address
from ..errors import SendError
from ..ops.manifest import channel_name
from ..results import SessionResult
from ..source.replay import ENDING_TEXT, Replay
from ..source.sender import SendResult

if TYPE_CHECKING:
    from ..source.qemu_sender import RamSent


def printable(text: object) -> str:
    """``str(text)`` that any UTF-8 stream can print: a path's bytes that are not
    UTF-8 (surrogate escapes) are shown as ``\\xNN``, as device names are."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def print_receive_summary(
    result: SessionResult, out: TextIO, *, max_queued_bytes: int | None = None
) -> None:
    """One line per device, one for the migration (MB/s: 10^6 bytes a second)."""
    for d in result.devices:
        print(
            f"device {d.device}: {d.bytes} bytes in {d.chunks} chunks, "
            f"config {d.config_bytes} bytes, {d.seconds:.3f} s "
            f"({d.bytes / 1e6 / d.seconds if d.seconds > 0 else 0.0:.1f} MB/s), "
            f"{d.digest} -> {printable(d.data_path)}",
            file=out,
        )
    spilled = f"spilled {result.spilled_bytes} bytes"
    if result.spilled_bytes:
        spilled += (
            " (chunks that came early went to disk and were read back in their turn, "
            f"to keep queued memory under --max-queued-bytes {max_queued_bytes})"
        )
    print(
        f"received {result.data_bytes} bytes in {result.seconds:.3f} s "
        f"({result.mb_per_s:.1f} MB/s); peak queued {result.peak_queued_bytes} bytes, "
        f"{spilled}, paused {result.paused_seconds:.3f} s",
        file=out,
    )
    qemu = None if result.qemu is None else result.qemu.summary()
    if qemu is not None:
        print(qemu, file=out)
    if result.reader_threads:
        print(f"channels read on {result.reader_threads} reader threads", file=out)
    tls = result.tls_summary()
    if tls is not None:
        print(tls, file=out)


def print_send_summary(
    result: SendResult,
    out: TextIO,
    address: Address,
    *,
    tls: bool = False,
    ram: RamSent | None = None,
) -> None:
    """One line per device, one for the whole (MB/s: 10^6 bytes a second), which says
    what the daemon's clean close of every channel means over this transport (over a
    unix socket, only TLS's close_notify proves it: a failure there cannot reset)."""
    for key, size, chunks, digest in result.devices:
        print(f"device {key}: {size} bytes in {chunks} chunks, {digest}", file=out)
    if ram is not None:
        print(
            f"ram: {ram.block} {ram.size} bytes in {ram.rounds} rounds: {ram.normal_pages} "
            f"pages, {ram.zero_pages} zero pages, {ram.sync_points} sync points; main stream "
            f"{ram.main_bytes} bytes",
            file=out,
        )
    verdict = (
        "the daemon closed every channel cleanly: it completed the migration"
        if address.kind == "tcp" or tls
        else "the daemon closed every channel (over a unix socket that does not prove it "
        "completed: its exit code says)"
    )
    print(
        f"sent {sum(d[1] for d in result.devices)} bytes in {result.seconds:.3f} s "
        f"({result.mb_per_s:.1f} MB/s) over {len(result.channel_bytes)} channels; {verdict}",
        file=out,
    )


def print_replay_plan(replay: Replay, out: TextIO, order: str) -> None:
    """What was recorded, what the daemon must be told, and the connection order."""
    manifest = replay.recording.manifest
    outcome = manifest.outcome
    if manifest.error is not None:
        outcome += f": {manifest.error.message}"
    multifd = [c for c in manifest.recorded_channels if c.id is not None]
    main = len(multifd) < len(manifest.recorded_channels)
    print(
        f"replaying {printable(replay.recording.directory)}: recorded {manifest.started_at} "
        f"by {manifest.tool}, {len(multifd)} of {manifest.channels} "
        f"channels{' and the main channel' if main else ''}, outcome {outcome}",
        file=out,
    )
    devices = " ".join(
        f"--device idstr={device.idstr.replace(',', ',,')},instance={device.instance},data=..."
        for device in manifest.devices
    )
    qemu = " --main-stream PATH (and --ram DIR if it carried RAM)" if main else ""
    print(
        f"the daemon needs: --channels {manifest.channels} --uuid {manifest.uuid}"
        f"{qemu} {devices}".rstrip(),
        file=out,
    )
    if manifest.tls:
        print(
            "the channels used TLS: the recording holds their plaintext (replay it to a daemon "
            "without --tls-creds, or give --tls-creds)",
            file=out,
        )
    if not manifest.complete:
        print(
            f"the recording is incomplete ({manifest.stopped}): only what was recorded is sent",
            file=out,
        )
    ids = ", ".join("main" if c.id is None else str(c.id) for c in replay.channels)
    print(f"connection order ({order}): channel ids {ids}", file=out, flush=True)


def print_replay_report(
    replay: Replay, out: TextIO, address: Address, error: SendError | None, *, tls: bool = False
) -> None:
    """One line per channel (bytes sent, how it ended), one for the whole (which says
    what a clean close means over this transport, as :func:`print_send_summary`)."""
    for channel, sent in zip(replay.channels, replay.sent, strict=True):
        ending = ENDING_TEXT[channel.end] if sent == channel.bytes else "then stopped"
        print(
            f"{channel_name(channel.id)}: sent {sent} of {channel.bytes} bytes, {ending}",
            file=out,
        )
    if error is not None:
        verdict = "not every channel ended cleanly (the error below says which, and why)"
    elif address.kind == "tcp" or tls:
        verdict = "the daemon closed every channel cleanly"
    else:
        verdict = (
            "the daemon closed every channel (over a unix socket that does not prove it "
            "completed: its exit code says)"
        )
    print(
        f"replayed {sum(replay.sent)} of {replay.total} bytes over {len(replay.channels)} "
        f"channels in {replay.seconds:.3f} s to {address}; {verdict}",
        file=out,
    )
