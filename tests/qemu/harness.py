"""A real QEMU as the migration source: start a small VM, migrate it with multifd, read its RAM.

Used by the tests that need a real QEMU and by ``make_fixtures.py``. Synchronous
(subprocesses, a unix-socket QMP client of its own): usable from any test, with
or without an event loop. Every wait is bounded and fails loudly.

The VM: ``-M pc -m 64 -accel tcg -display none -nodefaults``, a known blob
placed at guest-physical ``BLOB_ADDR`` with ``-device loader``, paused (``-S``,
nothing ever ran: RAM holds the blob and zeros) or running a 512-byte boot
sector that keeps rewriting a few MiB (see :func:`boot_sector`).

Which QEMUs: ``QEMU_7_2`` / ``QEMU_10_0`` in the environment (what
``tests/qemu/get-qemu.sh`` prints), else ``qemu-system-x86_64`` on PATH and the
checkout's ``.qemu/10.0`` that the script unpacks.

``tests/qemu/`` has no ``__init__.py`` on purpose: tests import ``qemu.harness``
as a portion of the namespace package ``qemu`` that the ``qemu.qmp`` library
also lives in; a regular package here would hide ``qemu.qmp``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]
PAGE_SIZE = 4096
RAM_MIB = 64
RAM_SIZE = RAM_MIB << 20
#: Where the blob goes (guest-physical, which is also its offset in ``pc.ram``).
BLOB_ADDR = 0x200000
#: Legacy VGA/ROM window: guest-physical addresses that are not ``pc.ram`` on ``-M pc``.
PC_WINDOW = range(0xA0000, 0x100000)
#: What the running guest rewrites (guest-physical), one dword per page per pass.
DIRTY_START = 0x400000
DIRTY_END = 0x800000

MIGRATION_DONE = ("completed", "failed", "cancelled")


class QemuError(Exception):
    """QEMU did something the harness did not expect (it names what, and QEMU's stderr)."""


# -- finding QEMU ---------------------------------------------------------------------


@dataclass(frozen=True)
class Qemu:
    """One QEMU binary, its version and the firmware directories it needs (``-L``)."""

    binary: Path
    version: tuple[int, int, int]
    package: str = ""
    firmware: tuple[Path, ...] = ()

    @property
    def label(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def zero_pages_in_packets(self) -> bool:
        """QEMU 9.0 and later send zero pages in multifd packets (unless legacy detection)."""
        return self.version >= (9, 0, 0)

    @classmethod
    def probe(cls, binary: Path) -> Qemu:
        """Ask ``binary --version``; a binary unpacked under ``<root>/usr/bin`` uses that root's firmware."""
        result = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30
        )
        match = re.search(r"version (\d+)\.(\d+)\.(\d+)(?: \((.*)\))?", result.stdout)
        if result.returncode != 0 or match is None:
            raise QemuError(f"{binary} --version: {result.stdout}{result.stderr}".strip())
        version = (int(match[1]), int(match[2]), int(match[3]))
        firmware: tuple[Path, ...] = ()
        root = binary.resolve().parent.parent.parent
        if root != Path("/") and (root / "usr/share/seabios").is_dir():
            firmware = (root / "usr/share/seabios", root / "usr/share/qemu")
        return cls(binary, version, match[4] or "", firmware)


def find_qemus() -> dict[str, Qemu]:
    """The QEMUs present, by major.minor (``"7.2"``, ``"10.0"``)."""
    candidates: list[Path] = []
    for variable in ("QEMU_7_2", "QEMU_10_0"):
        if os.environ.get(variable):
            candidates.append(Path(os.environ[variable]))
    on_path = shutil.which("qemu-system-x86_64")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(CHECKOUT / ".qemu/10.0/usr/bin/qemu-system-x86_64")
    found: dict[str, Qemu] = {}
    for binary in candidates:
        if not os.access(binary, os.X_OK):
            continue
        qemu = Qemu.probe(binary)
        found.setdefault(f"{qemu.version[0]}.{qemu.version[1]}", qemu)
    return found


# -- guest memory contents ------------------------------------------------------------


def make_blob(size: int, seed: int = 22) -> bytes:
    """Recognisable, incompressible page contents: each page starts with its index."""
    rng = random.Random(seed)
    pages = []
    for index in range(size // PAGE_SIZE):
        pages.append(struct.pack(">4sI", b"BLOB", index) + rng.randbytes(PAGE_SIZE - 8))
    return b"".join(pages)


def boot_sector(start: int = DIRTY_START, end: int = DIRTY_END) -> bytes:
    """A 512-byte MBR that enters 32-bit protected mode (flat segments) and then loops
    forever writing a pass counter into the first dword of every page of [start, end).

    Hand-assembled (no assembler needed where the tests run); loaded at 0x7c00.
    """
    assert start % PAGE_SIZE == 0 and end % PAGE_SIZE == 0 and start < end < RAM_SIZE
    origin = 0x7C00
    gdt_at = 0x60  # offsets in the sector
    descriptor_at = gdt_at + 24
    protected_at = 0x30
    real = b"".join(
        [
            bytes([0xFA]),  # cli
            bytes([0x31, 0xC0]),  # xor ax, ax
            bytes([0x8E, 0xD8]),  # mov ds, ax
            bytes([0xE4, 0x92, 0x0C, 0x02, 0xE6, 0x92]),  # in al, 0x92; or al, 2; out 0x92, al (A20)
            bytes([0x0F, 0x01, 0x16]) + struct.pack("<H", origin + descriptor_at),  # lgdt [desc]
            bytes([0x0F, 0x20, 0xC0, 0x0C, 0x01, 0x0F, 0x22, 0xC0]),  # cr0.PE = 1
            bytes([0xEA]) + struct.pack("<HH", origin + protected_at, 0x08),  # jmp 0x08:protected
        ]
    )
    assert len(real) <= protected_at
    inner = 18  # offset of the inner loop in the protected-mode code
    protected = (
        bytes([0x66, 0xB8, 0x10, 0x00])  # mov ax, 0x10
        + bytes([0x8E, 0xD8, 0x8E, 0xC0, 0x8E, 0xD0])  # mov ds, ax; mov es, ax; mov ss, ax
        + bytes([0x31, 0xC9])  # xor ecx, ecx
        + bytes([0x41])  # outer: inc ecx
        + bytes([0xBF]) + struct.pack("<I", start)  # mov edi, start
        + bytes([0x89, 0x0F])  # inner: mov [edi], ecx
        + bytes([0x81, 0xC7]) + struct.pack("<I", PAGE_SIZE)  # add edi, 4096
        + bytes([0x81, 0xFF]) + struct.pack("<I", end)  # cmp edi, end
    )
    assert protected[inner : inner + 2] == bytes([0x89, 0x0F])
    protected += bytes([0x72, (inner - (len(protected) + 2)) & 0xFF])  # jb inner
    protected += bytes([0xEB, (12 - (len(protected) + 2)) & 0xFF])  # jmp outer (offset 12)
    assert protected_at + len(protected) <= gdt_at
    gdt = (
        bytes(8)  # null descriptor
        + bytes([0xFF, 0xFF, 0, 0, 0, 0x9A, 0xCF, 0])  # 0x08: code, flat 4 GiB, 32-bit
        + bytes([0xFF, 0xFF, 0, 0, 0, 0x92, 0xCF, 0])  # 0x10: data, flat 4 GiB
    )
    descriptor = struct.pack("<HI", len(gdt) - 1, origin + gdt_at)
    sector = bytearray(512)
    sector[: len(real)] = real
    sector[protected_at : protected_at + len(protected)] = protected
    sector[gdt_at : gdt_at + len(gdt)] = gdt
    sector[descriptor_at : descriptor_at + len(descriptor)] = descriptor
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def page_digests(ram: bytes) -> dict[int, str]:
    """sha256 of every page of ``ram`` that is not all zero (outside the VGA/ROM window)."""
    zero = bytes(PAGE_SIZE)
    digests: dict[int, str] = {}
    for offset in range(0, len(ram), PAGE_SIZE):
        if offset in PC_WINDOW:
            continue
        page = ram[offset : offset + PAGE_SIZE]
        if page != zero:
            digests[offset // PAGE_SIZE] = hashlib.sha256(page).hexdigest()
    return digests


def mask_pc_window(ram: bytes | bytearray) -> bytes:
    """``ram`` with the 0xa0000-0xfffff window zeroed: it is not ``pc.ram`` as the guest sees it."""
    masked = bytearray(ram)
    masked[PC_WINDOW.start : PC_WINDOW.stop] = bytes(len(PC_WINDOW))
    return bytes(masked)


# -- QMP ------------------------------------------------------------------------------


class QmpError(QemuError):
    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"QMP {command}: {error.get('class')}: {error.get('desc')}")
        self.error_class = error.get("class")


class Qmp:
    """A minimal synchronous QMP client on a unix socket (one command at a time)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.settimeout(timeout)
        self.socket.connect(str(path))
        self.reader = self.socket.makefile("rb")
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QemuError(f"QMP greeting expected, got {greeting}")
        self.greeting = greeting["QMP"]
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise QemuError("QMP: QEMU closed the monitor")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.socket.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise QmpError(command, message["error"])
            elif "return" in message:
                return message["return"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.socket.close()


# -- the source VM --------------------------------------------------------------------


@dataclass
class SourceVm:
    """One source VM. Use as a context manager: QEMU is killed on the way out."""

    qemu: Qemu
    workdir: Path
    blob: bytes = b""
    running: bool = False
    uuid: str | None = None
    dirty: tuple[int, int] = (DIRTY_START, DIRTY_END)  # what the running guest rewrites
    rounds: int = 0
    process: subprocess.Popen[bytes] | None = None
    qmp: Qmp | None = None
    monitor_path: Path = field(init=False)
    stderr_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.monitor_path = self.workdir / "qmp.sock"
        self.stderr_path = self.workdir / "qemu.stderr"

    def command(self) -> list[str]:
        args = [str(self.qemu.binary)]
        for directory in self.qemu.firmware:
            args += ["-L", str(directory)]
        args += ["-M", "pc", "-m", str(RAM_MIB), "-accel", "tcg", "-display", "none",
                 "-nodefaults", "-qmp", f"unix:{self.monitor_path},server=on,wait=off"]
        if self.uuid:
            args += ["-uuid", self.uuid]
        if self.blob:
            blob_path = self.workdir / "blob.bin"
            blob_path.write_bytes(self.blob)
            args += ["-device", f"loader,file={blob_path},addr={BLOB_ADDR:#x}"]
        if self.running:
            disk = self.workdir / "boot.img"
            disk.write_bytes(boot_sector(*self.dirty) + bytes(512 * 7))
            args += ["-drive", f"file={disk},format=raw,if=ide"]
        else:
            args += ["-S"]
        return args

    def __enter__(self) -> SourceVm:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise QemuError(f"QEMU exited with {self.process.returncode}: {self.stderr()}")
            try:
                self.qmp = Qmp(self.monitor_path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise QemuError(f"no QMP socket after {timeout} s: {self.stderr()}") from None
                time.sleep(0.05)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def execute(self, command: str, **arguments: Any) -> Any:
        assert self.qmp is not None, "the VM is not started"
        return self.qmp.execute(command, **arguments)

    def set_multifd(
        self, channels: int, *, zero_page_detection: str | None = None, max_bandwidth: int = 0
    ) -> None:
        """Capability ``multifd``, ``multifd-channels``; on 9.0+ optionally
        ``zero-page-detection`` (``legacy`` sends zero pages on the main channel)."""
        self.execute(
            "migrate-set-capabilities",
            capabilities=[{"capability": "multifd", "state": True}],
        )
        parameters: dict[str, Any] = {"multifd-channels": channels}
        if max_bandwidth:
            parameters["max-bandwidth"] = max_bandwidth
        if zero_page_detection is not None:
            if not self.qemu.zero_pages_in_packets:
                raise QemuError(f"QEMU {self.qemu.label} has no zero-page-detection parameter")
            parameters["zero-page-detection"] = zero_page_detection
        self.execute("migrate-set-parameters", **parameters)

    def migrate(
        self, port: int, host: str = "127.0.0.1", *, rounds: int = 0, max_bandwidth: int = 16 << 20
    ) -> None:
        """Start migrating. ``rounds``: keep the migration from converging until it has
        synchronised the dirty bitmap that many times (a running guest's pages are
        then sent several times): a 1 ms downtime limit, lifted in :meth:`wait_migration`,
        and ``max_bandwidth`` (bytes/s) low enough that the first pass outlasts QEMU's
        first bandwidth estimate (before it, QEMU completes as soon as one pass is done)."""
        self.rounds = rounds
        if rounds:
            self.wait_guest_looping()
            self.execute(
                "migrate-set-parameters", **{"downtime-limit": 1, "max-bandwidth": max_bandwidth}
            )
        self.execute("migrate", uri=f"tcp:{host}:{port}")

    def wait_migration(self, timeout: float = 120.0) -> dict[str, Any]:
        """Poll ``query-migrate`` until completed, failed or cancelled; return the last answer."""
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.execute("query-migrate")
            if info.get("status") in MIGRATION_DONE:
                return info
            if self.rounds and info.get("ram", {}).get("dirty-sync-count", 0) >= self.rounds:
                self.execute("migrate-set-parameters", **{"downtime-limit": 10_000})
                self.rounds = 0
            if time.monotonic() > deadline:
                raise QemuError(f"migration not done after {timeout} s: {info}")
            time.sleep(0.02)

    def wait_guest_looping(self, passes: int = 2, timeout: float = 30.0) -> None:
        """Until the running guest's pass counter (the first dword of its first page) shows
        ``passes`` passes: it is rewriting its pages, so a bitmap sync finds them dirty
        and the migration cannot converge before ``rounds`` (a fixed wait was not always
        long enough on a loaded machine: it converged after 2 syncs)."""
        deadline = time.monotonic() + timeout
        while True:
            (counter,) = struct.unpack("<I", self.read_physical(self.dirty[0], 4))
            if counter >= passes:
                return
            if time.monotonic() > deadline:
                raise QemuError(f"the guest made {counter} passes in {timeout} s: {self.stderr()}")
            time.sleep(0.02)

    def read_ram(self, size: int = RAM_SIZE) -> bytes:
        """Guest-physical 0..size with QMP ``pmemsave`` (the 0xa0000-0xfffff window as QEMU reads it)."""
        return self.read_physical(0, size)

    def read_physical(self, address: int, size: int) -> bytes:
        """Guest-physical ``address`` .. ``address + size`` with QMP ``pmemsave``."""
        path = self.workdir / "ram.bin"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.execute("pmemsave", val=address, size=size, filename=str(path))
        data = path.read_bytes()
        path.unlink()
        if len(data) != size:
            raise QemuError(f"pmemsave wrote {len(data)} bytes, asked for {size}")
        return data

    def stop(self, timeout: float = 10.0) -> None:
        if self.qmp is not None:
            with contextlib.suppress(QemuError, OSError):
                self.qmp.execute("quit")
            self.qmp.close()
            self.qmp = None
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
            self.process = None


@contextlib.contextmanager
def source_vm(qemu: Qemu, workdir: Path, **options: Any) -> Iterator[SourceVm]:
    vm = SourceVm(qemu, workdir, **options)
    with vm:
        yield vm
