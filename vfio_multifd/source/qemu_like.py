"""A QEMU-10-like migration, encoded: the main stream and the multifd channels' bytes.

Pure: builds bytes, sends nothing. What QEMU 10.0 sends for a VM whose VFIO
devices use multifd device state transfer (PROTOCOL.md section 7), so that
tests and ``send --ram`` need no QEMU: the main channel with its
configuration, the ``ram`` section (block list, sync points, ``ZERO`` records
when zero pages are detected the legacy way), each VFIO device's sections
(setup, pre-copy data, the end-of-state markers multifd transfer leaves),
``MIG_CMD_SWITCHOVER_START``, ``QEMU_VM_EOF`` and a VM description; on the
multifd channels RAM packets (normal and zero pages) and one SYNC packet per
channel for every sync point, with the devices' stop-copy chunks as
device-state packets among the last RAM packets.

A running guest is given as successive images of its RAM: the first is sent
whole, each later one as the pages that changed (one round each, the last
one in the stop-copy phase), as QEMU resends dirty pages.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..core.ram import encode_ram_packet, pages_per_packet
from ..core.savevm import DEFAULT_PAGE_SIZE, Command, RamFlag, Record
from ..core.wire import (
    ChannelHandshake,
    ConfigTag,
    DeviceKey,
    encode_config_blob,
    encode_device_packet,
)
from .savevm_records import (
    command,
    configuration,
    file_header,
    footer,
    ram_block_list,
    ram_record,
    ram_zero,
    section_header,
    vfio_data,
    vfio_tag,
    vm_description,
)

# --- a whole migration ---------------------------------------------------------------


@dataclass(frozen=True)
class VfioDevice:
    """A VFIO device's state: pre-copy blocks (one per iteration, on the main channel),
    stop-copy chunks (idx 0.., device-state packets) and its config bytes (the last packet)."""

    key: DeviceKey
    precopy: tuple[bytes, ...] = ()
    chunks: tuple[bytes, ...] = ()
    config: bytes = b"config"


@dataclass
class QemuLikeStreams:
    """The bytes of each connection: the main channel, and each multifd channel by id."""

    main: bytes
    channels: list[bytes]
    sync_points: int = 0
    ram_packets: int = 0
    device_packets: int = 0
    description: bytes = b""
    normal_pages: int = 0  # pages sent with their data
    zero_pages: int = 0  # pages sent as zero: in RAM packets, or ZERO records (legacy)


@dataclass
class _Builder:
    channels: int
    page_size: int
    zero_page_detection: str
    uuid: bytes
    main: bytearray = field(default_factory=bytearray)
    packets: list[list[bytes]] = field(default_factory=list)
    packet_num: int = 0
    next_channel: int = 0
    last_block: str | None = None
    sync_points: int = 0
    ram_packets: int = 0
    device_packets: int = 0
    normal_pages: int = 0
    zero_pages: int = 0

    def __post_init__(self) -> None:
        self.packets = [[ChannelHandshake(c, self.uuid).encode()] for c in range(self.channels)]

    def send_packet(self, packet: bytes) -> None:
        """Round robin, as QEMU picks the next idle channel."""
        self.packets[self.next_channel].append(packet)
        self.next_channel = (self.next_channel + 1) % self.channels

    def send_pages(self, block: str, pages: Sequence[tuple[int, bytes]]) -> None:
        """Pages of one block: normal ones in RAM packets; zero ones in the same packets
        (zero-page-detection multifd) or as ZERO records on the main stream (legacy)."""
        zero_page = bytes(self.page_size)
        batch_normal: list[tuple[int, bytes]] = []
        batch_zero: list[int] = []
        limit = pages_per_packet(self.page_size)
        for offset, data in pages:
            if data == zero_page and self.zero_page_detection == "legacy":
                self.main += ram_zero(offset, None if self.last_block == block else block)
                self.last_block = block
                self.zero_pages += 1
                continue
            if data == zero_page:
                batch_zero.append(offset)
            else:
                batch_normal.append((offset, data))
            if len(batch_normal) + len(batch_zero) == limit:
                self._flush_batch(block, batch_normal, batch_zero)
                batch_normal, batch_zero = [], []
        if batch_normal or batch_zero:
            self._flush_batch(block, batch_normal, batch_zero)

    def _flush_batch(self, block: str, normal: list[tuple[int, bytes]], zero: list[int]) -> None:
        self.normal_pages += len(normal)
        self.zero_pages += len(zero)
        self.send_packet(
            encode_ram_packet(
                block=block, normal=normal, zero=zero, packet_num=self.packet_num,
                page_size=self.page_size,
            )
        )
        self.packet_num += 1
        self.ram_packets += 1

    def send_image(self, image: Mapping[str, bytes], previous: Mapping[str, bytes] | None) -> None:
        """A round: every page of ``image``, or those changed since ``previous``."""
        for name, data in image.items():
            self.send_pages(name, _pages(data, None if previous is None else previous[name], self.page_size))

    def end_ram_section(self) -> None:
        """A sync point, then EOS and the ram section's footer."""
        self.sync()
        self.main += ram_record(0, RamFlag.EOS) + footer(RAM_SECTION)

    def sync(self) -> None:
        """A sync point: MULTIFD_FLUSH on the main stream, an empty SYNC packet on every channel."""
        for channel in range(self.channels):
            self.packets[channel].append(encode_ram_packet(packet_num=self.packet_num, sync=True))
            self.packet_num += 1
        self.main += ram_record(0, RamFlag.MULTIFD_FLUSH)
        self.sync_points += 1


def _pages(image: bytes, previous: bytes | None, page_size: int) -> list[tuple[int, bytes]]:
    """Every page of ``image``, or only those that differ from ``previous``."""
    return [
        (offset, image[offset : offset + page_size])
        for offset in range(0, len(image), page_size)
        if previous is None
        or previous[offset : offset + page_size] != image[offset : offset + page_size]
    ]


RAM_SECTION = 1  # the ram section's id; VFIO devices' follow, the opaque device's is 0


def _precopy(
    build: _Builder,
    images: Sequence[Mapping[str, bytes]],
    devices: Sequence[VfioDevice],
    ids: Mapping[DeviceKey, int],
) -> Mapping[str, bytes] | None:
    """The pre-copy rounds: all but the last image, the VFIO devices' pre-copy
    data beside them. Returns the last image sent (None: no round)."""
    main = build.main
    previous: Mapping[str, bytes] | None = None
    for number, image in enumerate(images[:-1]):
        main += section_header(Record.SECTION_PART, RAM_SECTION)
        build.send_image(image, previous)
        build.end_ram_section()
        for device in devices:
            if number < len(device.precopy):
                main += section_header(Record.SECTION_PART, ids[device.key])
                main += vfio_data(device.precopy[number]) + vfio_tag(ConfigTag.END_OF_STATE)
                main += footer(ids[device.key])
        previous = image
    return previous


def qemu10_migration(
    images: Sequence[Mapping[str, bytes]],
    *,
    channels: int = 2,
    uuid: bytes = bytes(16),
    devices: Sequence[VfioDevice] = (),
    zero_pages: str = "multifd",
    machine: str = "pc-i440fx-10.0",
    opaque_device: bool = True,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> QemuLikeStreams:
    """Encode a migration of RAMBlocks whose contents are ``images[-1]``, sent in
    ``len(images)`` rounds (see the module docstring). ``zero_pages``: ``multifd``
    (QEMU 10's default) or ``legacy``. ``opaque_device``: also send a device
    section that is vmstate (``timer``), as every real VM has: the parser then
    recognises the end by the stream's tail."""
    blocks = _check_images(images, page_size)
    if zero_pages not in ("multifd", "legacy"):
        raise ValueError(f"zero_pages is multifd or legacy, not {zero_pages!r}")
    build = _Builder(channels, page_size, zero_pages, uuid)
    ids = {device.key: RAM_SECTION + 1 + n for n, device in enumerate(devices)}
    main = build.main
    main += file_header() + configuration(machine)
    # setup: the block list, a sync point; each VFIO device's setup marker
    main += section_header(Record.SECTION_START, RAM_SECTION, "ram", 0, 4)
    main += ram_block_list(blocks)
    build.end_ram_section()
    main += _device_setups(devices, ids)
    previous = _precopy(build, images, devices, ids)
    # stop-copy: the last image's changes, the devices' chunks among them
    main += command(Command.SWITCHOVER_START)
    main += section_header(Record.SECTION_END, RAM_SECTION)
    build.send_image(images[-1], previous)
    _send_device_state(build, devices)
    build.end_ram_section()
    main += _device_ends(devices, ids)
    description = _end(build, devices, ids, opaque_device)
    return QemuLikeStreams(
        bytes(main),
        [b"".join(packets) for packets in build.packets],
        build.sync_points,
        build.ram_packets,
        build.device_packets,
        description,
        build.normal_pages,
        build.zero_pages,
    )


def device_state_migration(
    devices: Sequence[VfioDevice],
    *,
    channels: int = 2,
    uuid: bytes = bytes(16),
    switchover_start: bool = True,
    machine: str = "pc-i440fx-10.0",
) -> QemuLikeStreams:
    """Only VFIO devices, no RAM section (a test's shape: a real VM always has RAM, whose
    sync points keep the channels behind the main stream): each device's pre-copy
    blocks on the main channel, its chunks on the multifd channels, which can then
    arrive before the main stream's pre-copy data. ``switchover_start``: send
    ``MIG_CMD_SWITCHOVER_START`` (machine types older than 10.0 do not)."""
    build = _Builder(channels, DEFAULT_PAGE_SIZE, "multifd", uuid)
    ids = {device.key: RAM_SECTION + 1 + n for n, device in enumerate(devices)}
    main = build.main
    main += file_header() + configuration(machine)
    main += _device_setups(devices, ids)
    for number in range(max((len(device.precopy) for device in devices), default=0)):
        for device in devices:
            if number < len(device.precopy):
                main += section_header(Record.SECTION_PART, ids[device.key])
                main += vfio_data(device.precopy[number]) + vfio_tag(ConfigTag.END_OF_STATE)
                main += footer(ids[device.key])
    if switchover_start:
        main += command(Command.SWITCHOVER_START)
    _send_device_state(build, devices)
    main += _device_ends(devices, ids)
    description = _end(build, devices, ids, opaque=False)
    return QemuLikeStreams(
        bytes(main),
        [b"".join(packets) for packets in build.packets],
        device_packets=build.device_packets,
        description=description,
    )


def _check_images(images: Sequence[Mapping[str, bytes]], page_size: int) -> dict[str, int]:
    """The block list the images share."""
    if not images:
        raise ValueError("at least one image of the RAM")
    blocks = {name: len(data) for name, data in images[0].items()}
    for image in images:
        if {name: len(data) for name, data in image.items()} != blocks:
            raise ValueError("every image has the same blocks and sizes")
    if any(size == 0 or size % page_size for size in blocks.values()):
        raise ValueError(f"block sizes are non-zero multiples of {page_size}")
    return blocks


def _device_setups(devices: Sequence[VfioDevice], ids: Mapping[DeviceKey, int]) -> bytes:
    """Each VFIO device's SECTION_START: its setup marker."""
    return b"".join(
        _device_section(Record.SECTION_START, ids[device.key], device)
        + vfio_tag(ConfigTag.DEV_SETUP_STATE)
        + vfio_tag(ConfigTag.END_OF_STATE)
        + footer(ids[device.key])
        for device in devices
    )


def _device_ends(devices: Sequence[VfioDevice], ids: Mapping[DeviceKey, int]) -> bytes:
    """Each VFIO device's SECTION_END: multifd device state transfer leaves only the end
    marker on the main channel."""
    return b"".join(
        section_header(Record.SECTION_END, ids[device.key])
        + vfio_tag(ConfigTag.END_OF_STATE)
        + footer(ids[device.key])
        for device in devices
    )


def _device_section(kind: Record, section_id: int, device: VfioDevice) -> bytes:
    return section_header(kind, section_id, device.key.idstr, device.key.instance_id, 1)


def _end(
    build: _Builder, devices: Sequence[VfioDevice], ids: Mapping[DeviceKey, int], opaque: bool
) -> bytes:
    """The devices sent whole (an opaque one if asked, each VFIO device's end marker),
    QEMU_VM_EOF and the VM description; returns the description."""
    described = [{"name": "ram", "instance_id": 0, "vmsd_name": "ram", "version": 4}]
    if opaque:
        build.main += section_header(Record.SECTION_FULL, 0, "timer", 0, 2)
        build.main += bytes(range(24)) + footer(0)
        described.append({"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2})
    for device in devices:
        build.main += _device_section(Record.SECTION_FULL, ids[device.key], device)
        build.main += vfio_tag(ConfigTag.END_OF_STATE) + footer(ids[device.key])
    description = json.dumps({"page_size": build.page_size, "devices": described}).encode()
    build.main += vm_description(description)
    return description


def _send_device_state(build: _Builder, devices: Sequence[VfioDevice]) -> None:
    """Each device's chunks, then its config packet, interleaved across devices."""
    queues = [
        [encode_device_packet(d.key, idx, chunk) for idx, chunk in enumerate(d.chunks)]
        + [encode_device_packet(d.key, len(d.chunks), encode_config_blob(d.config), config=True)]
        for d in devices
    ]
    while any(queues):
        for queue in queues:
            if queue:
                build.send_packet(queue.pop(0))
                build.device_packets += 1


GUEST_RAM_BLOCK = "pc.ram"


def guest_ram(
    size: int, seed: int, *, rounds: int = 3, page_size: int = DEFAULT_PAGE_SIZE
) -> list[dict[str, bytes]]:
    """A running guest's RAM (one block, ``pc.ram``) over ``rounds`` rounds, the same for
    the same ``size`` and ``seed``: at first a third of its pages random and the rest
    zero; each later round rewrites a sixteenth of them, one in four to zero."""
    if size <= 0 or size % page_size:
        raise ValueError(f"the RAM size is a non-zero multiple of {page_size} bytes, not {size}")
    rng = random.Random(f"ram:{seed}")
    pages = size // page_size
    ram = bytearray(size)
    for number in range(0, pages, 3):
        ram[number * page_size : (number + 1) * page_size] = rng.randbytes(page_size)
    images = [{GUEST_RAM_BLOCK: bytes(ram)}]
    for _ in range(1, rounds):
        for number in rng.sample(range(pages), max(1, pages // 16)):
            data = bytes(page_size) if number % 4 == 0 else rng.randbytes(page_size)
            ram[number * page_size : (number + 1) * page_size] = data
        images.append({GUEST_RAM_BLOCK: bytes(ram)})
    return images
