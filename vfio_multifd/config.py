"""Settings: parsed once from the command line (or built by library users), then frozen."""

from __future__ import annotations

import difflib
import enum
import os
import re
import stat
import uuid as uuid_module
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .core.ledger import smallest_chunk_bound, smallest_ram_share
from .core.wire import DEFAULT_MAX_PACKET_SIZE, VFIO_HEADER, DeviceKey, encode_idstr
from .errors import UsageError

#: ``64M`` / ``64MiB`` (binary), ``64MB`` (decimal), ``4096`` / ``4096B`` (bytes).
_SIZE = re.compile(r"^\s*(\d+)\s*(?:([kmgt])(ib|b)?|b)?\s*$", re.IGNORECASE | re.ASCII)
_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() also accepts "²", which int() refuses


def is_number(text: str) -> bool:
    """``text`` is a whole number in ASCII digits (what ``int`` takes, and no more)."""
    return _DIGITS.fullmatch(text) is not None
_BINARY = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """Bytes: ``4096``; ``64K``, ``1M``, ``2G``, ``1T`` and ``64KiB``... are binary (as QEMU
    reads them: ``1M`` is 1048576), ``64KB``, ``1MB``... decimal (``1MB`` is 1000000)."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(
            f"not a size: {text!r} (expected e.g. 4096, 64K or 64KiB, 1M or 1MiB, 2G; "
            "1MB is 1000000 bytes)"
        )
    number, prefix, suffix = match.groups()
    if prefix is None:
        return int(number)
    decimal = suffix is not None and suffix.lower() == "b"
    return int(number) * (_DECIMAL if decimal else _BINARY)[prefix.lower()]


def check_channels(channels: int) -> int:
    """The one check of a channel count (the command line's and the library's):
    a channel's id is one byte."""
    if not 1 <= channels <= 256:
        raise UsageError(f"--channels must be 1..256 (a one-byte id), not {channels}")
    return channels


def parse_uuid(text: str) -> bytes:
    try:
        return uuid_module.UUID(text).bytes
    except ValueError:
        raise UsageError(f"not a UUID: {text!r}") from None


@dataclass(frozen=True, slots=True)
class Address:
    """``tcp:HOST:PORT`` or ``unix:PATH``."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Address:
        kind, sep, rest = text.partition(":")
        if kind == "unix" and sep and rest:
            return cls("unix", path=rest)
        if kind == "tcp" and sep:
            host, sep, port = rest.rpartition(":")
            if sep and is_number(port) and int(port) < 65536:
                host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
                return cls("tcp", host=host or "127.0.0.1", port=int(port))
        raise UsageError(f"not an address: {text!r} (expected tcp:HOST:PORT or unix:PATH)")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_fields(text: str, *, what: str, allowed: set[str]) -> dict[str, str]:
    """``"idstr=a,instance=1"`` -> dict. Every comma ends a field and every field is
    checked, wherever it is; a comma inside a value is written twice, as in QEMU's
    own options: ``data=/tmp/a,,b.bin`` is the path ``/tmp/a,b.bin``."""
    fields: dict[str, str] = {}
    for part in split_fields(text):
        key, sep, value = part.partition("=")
        if not sep or key not in allowed:
            raise UsageError(f"{what} {text!r}: {_unknown_field(part, key, sep, allowed)}")
        if key in fields:
            raise UsageError(f"{what} {text!r}: field {key!r} given twice")
        fields[key] = value
    return fields


def split_fields(text: str) -> list[str]:
    """Split on single commas; ``,,`` is a comma inside a field."""
    parts: list[str] = []
    current: list[str] = []
    n = 0
    while n < len(text):
        if text[n] != ",":
            current.append(text[n])
        elif text.startswith(",,", n):
            current.append(",")
            n += 1
        else:
            parts.append("".join(current))
            current = []
        n += 1
    parts.append("".join(current))
    return parts


def _unknown_field(part: str, key: str, sep: str, allowed: set[str]) -> str:
    known = ", ".join(sorted(allowed))
    if not sep:
        return (
            f"{part!r} is not a field (fields are KEY=VALUE: {known}; "
            "a comma inside a value is written twice, as in data=a,,b.bin)"
        )
    guess = difflib.get_close_matches(key, sorted(allowed), n=1)
    hint = f"; did you mean {guess[0]}=?" if guess else ""
    return f"unknown field {key!r} in {part!r} (fields: {known}){hint}"


def parse_device_key(fields: dict[str, str], text: str) -> DeviceKey:
    idstr = fields.get("idstr")
    if not idstr:
        raise UsageError(f"device {text!r}: idstr= is required")
    try:
        encode_idstr(idstr)
    except ValueError as error:
        raise UsageError(f"device {text!r}: {error}") from None
    instance = fields.get("instance", "0")
    if not is_number(instance) or int(instance) > 0xFFFFFFFF:
        raise UsageError(f"device {text!r}: instance must be 0..4294967295, not {instance!r}")
    return DeviceKey(idstr, int(instance))


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device the destination expects, and where its state goes."""

    key: DeviceKey
    data_path: Path
    config_path: Path

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        fields = parse_fields(text, what="device", allowed={"idstr", "instance", "data", "config"})
        key = parse_device_key(fields, text)
        data = fields.get("data")
        if not data:
            raise UsageError(f"device {text!r}: data=PATH is required")
        config = fields.get("config") or data + ".config"
        return cls(key, Path(data), Path(config))


def check_distinct_files(named: Sequence[tuple[str, Path]]) -> None:
    """Raise :class:`UsageError` if two of the named paths are one file: the same path
    once symbolic links are resolved, or the same inode (a hard link). ``named`` pairs
    an option's name with its path."""
    seen: dict[tuple[object, ...], str] = {}
    for name, path in named:
        keys: list[tuple[object, ...]] = [("path", os.path.realpath(path))]
        try:
            info = os.stat(path)
        except OSError:
            pass
        else:
            keys.append(("inode", info.st_dev, info.st_ino))
        for key in keys:
            if key in seen:
                raise UsageError(
                    f"{seen[key]} and {name} are the same file; each needs a path of its own"
                )
        for key in keys:
            seen[key] = name


def check_outside(named: Sequence[tuple[str, Path]], directory: Path, option: str) -> None:
    """Raise :class:`UsageError` if one of the named paths lies inside ``directory``
    (``option``'s, which must hold nothing else), symbolic links resolved."""
    root = os.path.realpath(directory)
    for name, path in named:
        if name.startswith(option + " "):
            continue
        if os.path.commonpath([root, os.path.realpath(path)]) == root:
            raise UsageError(
                f"{name} is inside {option} {directory}, which holds the recording and nothing else"
            )


def _shareable(path: Path) -> bool:
    """A character device or FIFO (``/dev/null``) may be the output of several devices."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


MiB = 1 << 20

#: The CLI's default --max-queued-bytes. Bounded by default: a daemon's memory
#: should not depend on the order a source happens to send in, and a bounded
#: queue keeps buffers recycled and the completion lag short when the disk is
#: slower than the network.
DEFAULT_MAX_QUEUED_BYTES = 64 << 20


class QueueFullPolicy(enum.StrEnum):
    SPILL = "spill"  # ours: stay under the bound, never fail, never deadlock
    FAIL = "fail"  # QEMU's x-migration-max-queued-buffers-size


class Digest(enum.StrEnum):
    XXH3_128 = "xxh3-128"
    SHA256 = "sha256"
    NONE = "none"  # nothing computed: what hashing costs, measured by leaving it out


#: --missing-channels-grace: long enough for a source's slow channel to connect
#: after the others have sent everything, short enough that a --channels mismatch
#: fails while its operator is still looking.
DEFAULT_MISSING_CHANNELS_GRACE = 5.0

#: Connections without a complete handshake held at once; a real migration has at
#: most 256 channels, each handshaking for a round trip.
DEFAULT_MAX_PENDING_CONNECTIONS = 512


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """``receive --tls-creds DIR``: a directory laid out as QEMU's ``tls-creds-x509``
    for a server endpoint, ``verify-peer`` and the ``tls-authz`` subjects allowed."""

    creds_dir: Path
    verify_peer: bool = True
    authz: tuple[str, ...] = ()  # certificate subjects allowed (empty: any from the CA)

    def __post_init__(self) -> None:
        if self.authz and not self.verify_peer:
            raise UsageError(
                "--tls-authz needs --tls-verify-peer yes: a client that is not asked for a "
                "certificate has no subject to check"
            )


#: ``--record``: received bytes that may wait for the recording's disk at once; past
#: this the disk has fallen behind the network, and the recording stops.
DEFAULT_RECORD_QUEUED_BYTES = 64 << 20
#: ``--record``: refused connections kept as files (the rest are only counted).
DEFAULT_RECORD_REFUSED = 16


@dataclass(frozen=True, slots=True)
class RecordSettings:
    """``receive --record DIR``: every channel's bytes as received, kept in DIR."""

    directory: Path
    max_queued_bytes: int = DEFAULT_RECORD_QUEUED_BYTES
    max_refused: int = DEFAULT_RECORD_REFUSED


@dataclass(frozen=True, slots=True)
class ReceiveSettings:
    devices: tuple[DeviceSpec, ...]
    listen: Address = Address("tcp", "127.0.0.1", 4444)
    channels: int = 2
    uuid: bytes = bytes(16)
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    max_queued_bytes: int | None = DEFAULT_MAX_QUEUED_BYTES  # None: no bound
    on_queue_full: QueueFullPolicy = QueueFullPolicy.SPILL
    spill_dir: Path | None = None  # None: beside the first data file
    max_spill_bytes: int | None = None  # None: no cap
    accept_timeout: float | None = None
    handshake_timeout: float = 10.0
    max_pending_connections: int = DEFAULT_MAX_PENDING_CONNECTIONS
    progress_timeout: float | None = 150.0  # KubeVirt's default
    #: Once every connected channel has ended while others never came: fail this
    #: much later unless they come (None: wait for the timeouts above).
    missing_channels_grace: float | None = DEFAULT_MISSING_CHANNELS_GRACE
    digest: Digest = Digest.XXH3_128
    fsync: bool = True
    tls: TlsSettings | None = None  # None: plaintext channels
    reader_threads: int | None = None  # None: reader_threads.default_reader_threads
    record: RecordSettings | None = None  # None: nothing recorded
    main_stream: Path | None = None  # --main-stream: QEMU's main channel kept here
    ram: Path | str | None = None  # --ram DIR, or "discard"; None: no RAM packets taken

    def __post_init__(self) -> None:
        if not self.devices and self.ram is None:
            raise UsageError("at least one --device is required (or --ram, for RAM only)")
        if self.ram is not None and self.main_stream is None:
            raise UsageError(
                "--ram needs --main-stream PATH: the main stream's block list names the RAMBlocks "
                "(--main-stream /dev/null keeps none of its bytes)"
            )
        check_channels(self.channels)
        if self.reader_threads is not None and not 0 <= self.reader_threads <= self.channels:
            raise UsageError(
                f"--reader-threads must be 0 (the main loop reads) to --channels "
                f"({self.channels}), not {self.reader_threads}"
            )
        if self.max_pending_connections < 1:
            raise UsageError(
                f"--max-pending-connections must be 1 or more, not {self.max_pending_connections}"
            )
        keys = [device.key for device in self.devices]
        if len(set(keys)) != len(keys):
            raise UsageError("a device (idstr + instance) is listed twice")
        if self.record is not None and self.digest is Digest.NONE:
            raise UsageError(
                "--digest none cannot be used with --record: a recording's manifest "
                "holds the digest of every file, which replay checks"
            )
        self.check_paths()
        if self.max_packet_size < VFIO_HEADER.size:
            raise UsageError(
                f"--max-packet-size {self.max_packet_size} is below {VFIO_HEADER.size}, "
                "the size of a VFIO header alone"
            )
        smallest = self.smallest_bound
        if self.max_queued_bytes is not None and self.max_queued_bytes < smallest:
            why = (
                "the largest chunk and its bookkeeping"
                if self.on_queue_full is QueueFullPolicy.FAIL
                else "a reserve for the chunk a loader needs next, and a buffer to spill from, "
                "each as large as the largest chunk"
            )
            if self.main_stream is not None or self.ram is not None:
                why += (
                    f"; and {smallest_ram_share(self.channels)} for QEMU's streams (a RAM packet "
                    "being read on each channel and the main channel, one queued for the writer)"
                )
            raise UsageError(
                f"--max-queued-bytes {self.max_queued_bytes} is too small for --max-packet-size "
                f"{self.max_packet_size}: the smallest bound that works is {smallest} ({why}); "
                f"give --max-queued-bytes {-(-smallest // MiB)}MiB or more"
            )

    def check_paths(self, *extra: tuple[str, Path]) -> None:
        """No two of the session's paths and ``extra`` (the status socket) are one file,
        and none lies inside --record DIR: raises :class:`UsageError` naming them."""
        named = [*self.named_paths(), *extra]
        check_distinct_files(named)
        if self.record is not None:
            check_outside(named, self.record.directory, "--record")

    def named_paths(self) -> list[tuple[str, Path]]:
        """Every path the session writes or listens on, with the option that names it;
        no two may be one file (character devices and FIFOs may be shared by outputs)."""
        named: list[tuple[str, Path]] = []
        if self.listen.kind == "unix":
            named.append((f"--listen {self.listen}", Path(self.listen.path)))
        for device in self.devices:
            for what, path in (("data", device.data_path), ("config", device.config_path)):
                if not _shareable(path):
                    named.append((f"--device {device.key} {what}={path}", path))
        if self.spill_dir is not None:
            named.append((f"--spill-dir {self.spill_dir}", self.spill_dir))
        if self.main_stream is not None and not _shareable(self.main_stream):
            named.append((f"--main-stream {self.main_stream}", self.main_stream))
        if isinstance(self.ram, Path):
            named.append((f"--ram {self.ram}", self.ram))
        if self.record is not None:
            named.append((f"--record {self.record.directory}", self.record.directory))
        return named

    @property
    def max_payload_size(self) -> int:
        """The largest chunk a packet may carry (its payload after the VFIO header)."""
        return self.max_packet_size - VFIO_HEADER.size

    @property
    def smallest_bound(self) -> int:
        """The smallest --max-queued-bytes with which every arrival order completes (with
        QEMU's streams: and the RAM writer's smallest share)."""
        chunks = smallest_chunk_bound(
            self.max_payload_size, fail_when_full=self.on_queue_full is QueueFullPolicy.FAIL
        )
        if self.main_stream is None and self.ram is None:
            return chunks
        return chunks + smallest_ram_share(self.channels)
