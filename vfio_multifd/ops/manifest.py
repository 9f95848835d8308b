"""A recording's manifest (``receive --record DIR``): what each file holds, and how it ended.

Pure: JSON text in and out, no files. :class:`Manifest` is written by the
recorder (``recorder.py``) as ``DIR/manifest.json`` and read back by ``vfio-multifd
replay`` (``replay.py``), which trusts nothing in it: :meth:`Manifest.from_json`
checks every field, and a file name is accepted only in the form the
recorder writes (``channel-<id>.bin``, ``main-channel.bin``, ``refused-<n>.bin``),
so a manifest cannot send the replay outside its directory. QEMU's main
channel (``--main-stream``) is a recorded channel whose ``id`` is null.

Times are seconds on the daemon's monotonic clock since the recording started
(just before the daemon listens): ``first_byte_s`` and ``last_byte_s`` of a
channel say when its first and last bytes were received.

Each channel's ``digest`` is that of its file, in the daemon's ``--digest``
(``xxh3-128:<hex>`` or ``sha256:<hex>``): a replay checks every file against
it before it sends a byte. A manifest without them (written before they were
added) is refused: its files cannot be checked, and a replay of a damaged file
would give other outputs, or another error, where it promises the same. Each
device's ``digest`` is the one the daemon reported for the data it wrote, or
null when the migration did not complete.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

_REFUSED_FILE = re.compile(r"refused-([0-9]{1,5})\.bin")
#: Hex digits of each --digest (config.Digest: not imported, this module is pure), as
#: digest.format_digest writes it: ``xxh3-128:<32 hex digits>``.
_DIGEST_HEX = {"xxh3-128": 32, "sha256": 64}


def channel_file(channel_id: int | None) -> str:
    """The file of accepted channel ``channel_id``: ``channel-3.bin``; QEMU's main channel
    (None): ``main-channel.bin``."""
    return "main-channel.bin" if channel_id is None else f"channel-{channel_id}.bin"


def channel_name(channel_id: int | None) -> str:
    """``channel 3``, or ``main channel``."""
    return "main channel" if channel_id is None else f"channel {channel_id}"


def refused_file(n: int) -> str:
    """The file of the ``n``-th refused connection kept: ``refused-0.bin``."""
    return f"refused-{n}.bin"


class ChannelEnd(enum.StrEnum):
    """How a recorded channel ended, as the daemon saw it, until the migration's
    outcome was decided (what came after that did not cause it)."""

    EOF = "eof"  # the source ended its stream: a FIN, or TLS close_notify
    LOST = "lost"  # the connection broke (a reset) before the source ended it
    OPEN = "open"  # still open when the outcome was decided: the daemon hung up


class ManifestError(ValueError):
    """A manifest that is not valid JSON of this format (the message says where)."""


@dataclass(frozen=True, slots=True)
class RecordedChannel:
    id: int | None  # None: QEMU's main channel
    file: str
    peer: str
    bytes: int  # in the file
    received: int  # received by the daemon: more than ``bytes`` if the recording stopped
    first_byte_s: float | None
    last_byte_s: float | None
    end: ChannelEnd
    digest: str  # of the file's bytes: xxh3-128:<hex> or sha256:<hex>


@dataclass(frozen=True, slots=True)
class RefusedConnection:
    file: str
    peer: str
    reason: str  # the refusal's reason code (errors.Reason), e.g. handshake-uuid
    message: str
    bytes: int
    first_byte_s: float | None


@dataclass(frozen=True, slots=True)
class RecordedDevice:
    idstr: str
    instance: int
    digest: str | None = None  # of the data written, as the daemon reported it (None: failed)


@dataclass(frozen=True, slots=True)
class RecordedError:
    """The error the migration ended with, as the daemon printed it (``message``)."""

    reason: str
    message: str
    channel: int | None = None
    device: str | None = None
    idx: int | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    tool: str  # vfio-multifd VERSION
    started_at: str  # UTC, ISO 8601: when the recording started
    uuid: str
    channels: int  # --channels
    tls: bool  # the channels used TLS: the files hold the plaintext
    listen: str
    devices: tuple[RecordedDevice, ...]
    outcome: str  # completed, failed, cancelled
    error: RecordedError | None
    complete: bool  # every byte every channel received is in its file
    stopped: str | None  # why the recording stopped early (complete is then false)
    recorded_channels: tuple[RecordedChannel, ...]
    refused: tuple[RefusedConnection, ...]
    refused_not_kept: int  # refused connections past the cap: counted, not kept
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        fields = asdict(self)
        ordered = {"format_version": fields.pop("format_version"), **fields}
        return json.dumps(ordered, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as error:  # RecursionError: nested too deeply
            raise ManifestError(f"not JSON: {error}") from None
        fields = _Fields(raw, "the manifest")
        version = fields.integer("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"format_version {version}: this vfio-multifd reads version {FORMAT_VERSION}"
            )
        failure = fields.optional_object("error")
        channels = fields.integer("channels")
        return cls(
            tool=fields.text("tool"),
            started_at=fields.text("started_at"),
            uuid=fields.text("uuid"),
            channels=channels,
            tls=fields.boolean("tls"),
            listen=fields.text("listen"),
            devices=tuple(
                RecordedDevice(
                    item.text("idstr"), item.integer("instance"), item.optional_digest("digest")
                )
                for item in fields.objects("devices")
            ),
            outcome=fields.text("outcome"),
            error=None if failure is None else _error(failure),
            complete=fields.boolean("complete"),
            stopped=fields.optional_text("stopped"),
            recorded_channels=_channels(fields.objects("recorded_channels"), channels),
            refused=tuple(_refused(item) for item in fields.objects("refused")),
            refused_not_kept=fields.integer("refused_not_kept"),
            format_version=version,
        )


def _error(fields: _Fields) -> RecordedError:
    return RecordedError(
        reason=fields.text("reason"),
        message=fields.text("message"),
        channel=fields.optional_integer("channel"),
        device=fields.optional_text("device"),
        idx=fields.optional_integer("idx"),
    )


def _channels(items: list[_Fields], channels: int) -> tuple[RecordedChannel, ...]:
    """The recorded channels: each id once, and below ``channels`` (as the daemon accepts them)."""
    recorded: dict[int | None, RecordedChannel] = {}
    for item in items:
        channel = _channel(item)
        if channel.id is not None and channel.id >= channels:
            raise ManifestError(
                f"{item.where}: channel id {channel.id} is not below channels {channels}"
            )
        if channel.id in recorded:
            what = "the main channel" if channel.id is None else f"channel id {channel.id}"
            raise ManifestError(f"{item.where}: {what} is recorded twice")
        recorded[channel.id] = channel
    return tuple(recorded.values())


def _channel(fields: _Fields) -> RecordedChannel:
    channel_id = fields.optional_integer("id")
    file = fields.text("file")
    if file != channel_file(channel_id):
        raise ManifestError(f"{fields.where}: file {file!r} is not {channel_file(channel_id)!r}")
    try:
        end = ChannelEnd(fields.text("end"))
    except ValueError:
        raise ManifestError(f"{fields.where}: end must be one of eof, lost, open") from None
    if "digest" not in fields.raw:
        raise ManifestError(
            f"{fields.where}: digest is missing: this recording's manifest has no digest of its "
            "channel files (it was written before vfio-multifd put them there), and a replay "
            "refuses files it cannot check; record the migration again"
        )
    first, last = fields.optional_number("first_byte_s"), fields.optional_number("last_byte_s")
    if first is not None and last is not None and last < first:
        raise ManifestError(f"{fields.where}: last_byte_s {last} is before first_byte_s {first}")
    return RecordedChannel(
        id=channel_id,
        file=file,
        peer=fields.text("peer"),
        bytes=fields.integer("bytes"),
        received=fields.integer("received"),
        first_byte_s=first,
        last_byte_s=last,
        end=end,
        digest=fields.digest("digest"),
    )


def _refused(fields: _Fields) -> RefusedConnection:
    file = fields.text("file")
    if not _REFUSED_FILE.fullmatch(file):
        raise ManifestError(f"{fields.where}: file {file!r} is not refused-<n>.bin")
    return RefusedConnection(
        file=file,
        peer=fields.text("peer"),
        reason=fields.text("reason"),
        message=fields.text("message"),
        bytes=fields.integer("bytes"),
        first_byte_s=fields.optional_number("first_byte_s"),
    )


class _Fields:
    """One JSON object's fields, each taken with its type checked; errors say where."""

    def __init__(self, raw: object, where: str) -> None:
        if not isinstance(raw, dict):
            raise ManifestError(f"{where} is not a JSON object")
        self.raw: dict[str, Any] = raw
        self.where = where

    def _get(self, name: str) -> Any:
        if name not in self.raw:
            raise ManifestError(f"{self.where}: {name} is missing")
        return self.raw[name]

    def _wrong(self, name: str, expected: str) -> ManifestError:
        return ManifestError(f"{self.where}: {name} must be {expected}, not {self.raw[name]!r}")

    def text(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            raise self._wrong(name, "a string")
        return value

    def optional_text(self, name: str) -> str | None:
        return None if self.raw.get(name) is None else self.text(name)

    def integer(self, name: str) -> int:
        value = self._get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self._wrong(name, "a whole number of 0 or more")
        return value

    def optional_integer(self, name: str) -> int | None:
        return None if self.raw.get(name) is None else self.integer(name)

    def optional_number(self, name: str) -> float | None:
        value = self.raw.get(name)
        if value is None:
            return None
        # A time: a replay waits for it, so neither NaN, nor infinite, nor negative.
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise self._wrong(name, "a number of 0 or more")
        return float(value)

    def digest(self, name: str) -> str:
        value = self.text(name)
        algorithm, _, hex_digits = value.partition(":")
        if len(hex_digits) != _DIGEST_HEX.get(algorithm) or hex_digits.strip("0123456789abcdef"):
            raise self._wrong(name, "xxh3-128:<32 hex digits> or sha256:<64 hex digits>")
        return value

    def optional_digest(self, name: str) -> str | None:
        return None if self.raw.get(name) is None else self.digest(name)

    def boolean(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise self._wrong(name, "true or false")
        return value

    def optional_object(self, name: str) -> _Fields | None:
        value = self.raw.get(name)
        return None if value is None else _Fields(value, f"{self.where}: {name}")

    def objects(self, name: str) -> list[_Fields]:
        value = self._get(name)
        if not isinstance(value, list):
            raise self._wrong(name, "a list")
        return [_Fields(item, f"{self.where}: {name}[{n}]") for n, item in enumerate(value)]
