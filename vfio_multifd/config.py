"""Settings: parsed once from the command line (or built by library users), then frozen."""

from __future__ import annotations

import enum
import re
import uuid as uuid_module
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .reassembly import CHUNK_OVERHEAD, capacity_of
from .wire import DEFAULT_MAX_PACKET_SIZE, VFIO_HEADER, DeviceKey, encode_idstr

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"1M"`` -> 1048576. Binary units; ``K``, ``KiB`` and ``KB`` all mean 1024."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"not a size: {text!r} (expected e.g. 4096, 64K, 1M, 2G)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


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
            if sep and port.isdigit() and int(port) < 65536:
                host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
                return cls("tcp", host=host or "127.0.0.1", port=int(port))
        raise UsageError(f"not an address: {text!r} (expected tcp:HOST:PORT or unix:PATH)")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_fields(text: str, *, what: str, allowed: set[str]) -> dict[str, str]:
    """``"idstr=a,instance=1"`` -> dict. An idstr may itself contain commas only
    if it is the last field, so a ``key=value`` list is split on ``,key=``."""
    fields: dict[str, str] = {}
    keys = "|".join(sorted(allowed))
    for part in re.split(rf",(?=(?:{keys})=)", text):
        key, sep, value = part.partition("=")
        if not sep or key not in allowed:
            raise UsageError(
                f"{what} {text!r}: unknown field {part!r} (fields: {', '.join(sorted(allowed))})"
            )
        if key in fields:
            raise UsageError(f"{what} {text!r}: field {key!r} given twice")
        fields[key] = value
    return fields


def parse_device_key(fields: dict[str, str], text: str) -> DeviceKey:
    idstr = fields.get("idstr")
    if not idstr:
        raise UsageError(f"device {text!r}: idstr= is required")
    try:
        encode_idstr(idstr)
    except ValueError as error:
        raise UsageError(f"device {text!r}: {error}") from None
    instance = fields.get("instance", "0")
    if not instance.isdigit() or int(instance) > 0xFFFFFFFF:
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
    progress_timeout: float | None = 150.0  # KubeVirt's default
    digest: Digest = Digest.XXH3_128
    fsync: bool = True
    tls: TlsSettings | None = None  # None: plaintext channels

    def __post_init__(self) -> None:
        if not self.devices:
            raise UsageError("at least one --device is required")
        check_channels(self.channels)
        keys = [device.key for device in self.devices]
        if len(set(keys)) != len(keys):
            raise UsageError("a device (idstr + instance) is listed twice")
        # Character devices and FIFOs (/dev/null) may be shared; files may not.
        paths = [
            p.resolve()
            for d in self.devices
            for p in (d.data_path, d.config_path)
            if p.is_file() or not p.exists()
        ]
        if len(set(paths)) != len(paths):
            raise UsageError("two outputs share one path")
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
            raise UsageError(
                f"--max-queued-bytes {self.max_queued_bytes} is too small for --max-packet-size "
                f"{self.max_packet_size}: the smallest bound that works is {smallest} ({why})"
            )

    @property
    def max_payload_size(self) -> int:
        """The largest chunk a packet may carry (its payload after the VFIO header)."""
        return self.max_packet_size - VFIO_HEADER.size

    @property
    def smallest_bound(self) -> int:
        """The smallest --max-queued-bytes with which every arrival order completes."""
        largest = capacity_of(self.max_payload_size) + CHUNK_OVERHEAD
        if self.on_queue_full is QueueFullPolicy.FAIL:
            return largest
        return largest + capacity_of(self.max_payload_size)
