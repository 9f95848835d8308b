"""RAM images (daemon/ram_images.py): names from the wire, sizes, holes, and files that
appear only complete, never through a link, never bigger than the disk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import test_file_safety

from vfio_multifd.core.savevm import RamBlock
from vfio_multifd.daemon.ram_images import RamImages, image_name, image_names
from vfio_multifd.errors import DeviceIOError, ProtocolError, Reason, SessionError, UsageError

PAGE = 4096
victim = test_file_safety.victim  # the fixture: a file that a planted link must not reach
BLOCKS = (
    RamBlock("pc.ram", 256 * PAGE),
    RamBlock("/rom@etc/acpi/tables", 32 * PAGE),
    RamBlock("100%/x", PAGE),
)


def images_in(tmp_path: Path, **options: object) -> RamImages:
    return RamImages(tmp_path / "ram", fsync=False, **options)  # type: ignore[arg-type]


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize(
    ("block", "name"),
    [
        ("pc.ram", "pc.ram"),
        ("/rom@etc/acpi/tables", "%2From@etc%2Facpi%2Ftables"),
        ("100%/x", "100%25%2Fx"),
        ("%2F", "%252F"),  # never the same file as "/"
        ("..x", "..x"),
        (".hidden", ".hidden"),
    ],
)
def test_file_names(block: str, name: str) -> None:
    assert image_name(block) == name


@pytest.mark.parametrize("block", ["", ".", "..", "a\0b", "x" * 254 + "/"])
def test_names_that_cannot_be_a_file_of_the_directory(block: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        image_name(block)
    assert raised.value.reason is Reason.RAM_BLOCK
    assert repr(block)[:40] in str(raised.value)


def test_names_that_collide_once_case_folded() -> None:
    with pytest.raises(ProtocolError) as raised:
        image_names([RamBlock("pc.ram", PAGE), RamBlock("PC.RAM", PAGE)])
    assert raised.value.reason is Reason.RAM_BLOCK
    assert "RAMBlocks 'pc.ram' and 'PC.RAM' would be one file (PC.RAM)" in str(raised.value)
    assert image_names([RamBlock("/a", PAGE), RamBlock("%2Fa", PAGE)]) == {"/a": "%2Fa", "%2Fa": "%252Fa"}


def test_images_are_sized_sparse_and_appear_only_when_committed(tmp_path: Path) -> None:
    images = images_in(tmp_path)
    images.create(BLOCKS)
    directory = tmp_path / "ram"
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    temporary = listing(directory)
    parts = [n for n in temporary if n.endswith(".part")]
    assert len(parts) == 3 and all(n.startswith(".") for n in parts)
    # Each final path is locked for the run (a second daemon is refused), by a dot file.
    locks = {".pc.ram.lock", ".%2From@etc%2Facpi%2Ftables.lock", ".100%25%2Fx.lock"}
    assert set(temporary) - set(parts) == locks
    page = bytes(range(256)) * 16
    images.write_page("pc.ram", 7 * PAGE, page)
    images.write_page("/rom@etc/acpi/tables", 31 * PAGE, page)
    images.zero_page("pc.ram", 9 * PAGE)  # a hole stays a hole
    images.finish()
    images.commit()
    assert listing(directory) == ["%2From@etc%2Facpi%2Ftables", "100%25%2Fx", "pc.ram"]
    ram = (directory / "pc.ram").read_bytes()
    assert len(ram) == 256 * PAGE
    assert ram == bytes(7 * PAGE) + page + bytes(248 * PAGE)
    assert (directory / "%2From@etc%2Facpi%2Ftables").read_bytes() == bytes(31 * PAGE) + page
    assert (directory / "100%25%2Fx").read_bytes() == bytes(PAGE)
    assert os.stat(directory / "pc.ram").st_blocks * 512 <= 4 * PAGE, "zero pages are holes"
    assert (images.pages_written, images.zero_pages, images.zero_pages_written) == (2, 1, 0)


def test_a_zero_page_over_data_writes_zeros_and_a_fill_byte_fills(tmp_path: Path) -> None:
    images = images_in(tmp_path)
    images.create(BLOCKS)
    images.write_page("pc.ram", 0, b"\xff" * PAGE)
    images.zero_page("pc.ram", 0)
    images.zero_page("pc.ram", PAGE, fill=0x5A)
    images.zero_page("pc.ram", 0)  # already zero: nothing written
    images.finish()
    images.commit()
    ram = (tmp_path / "ram" / "pc.ram").read_bytes()
    assert ram[: 2 * PAGE] == bytes(PAGE) + b"\x5a" * PAGE
    assert images.zero_pages_written == 1


@pytest.mark.parametrize(
    ("block", "offset", "reason", "words"),
    [
        ("pc.rom", 0, Reason.RAM_BLOCK, "RAMBlock 'pc.rom' has no image"),
        ("pc.ram", 256 * PAGE, Reason.RAM_OFFSET, "page offset 0x100000 of RAMBlock pc.ram"),
        ("pc.ram", 100, Reason.RAM_OFFSET, "page offset 0x64"),
    ],
)
def test_pages_outside_the_images_are_refused(tmp_path: Path, block: str, offset: int, reason: Reason, words: str) -> None:
    images = images_in(tmp_path)
    images.create(BLOCKS)
    for write in (lambda: images.write_page(block, offset, bytes(PAGE)), lambda: images.zero_page(block, offset)):
        with pytest.raises(ProtocolError) as raised:
            write()
        assert raised.value.reason is reason
        assert words in str(raised.value)
    images.discard()
    assert listing(tmp_path / "ram") == []


def test_a_block_list_bigger_than_the_free_space_is_refused_before_any_file(tmp_path: Path) -> None:
    huge = (RamBlock("pc.ram", 1 << 50), RamBlock("pc.bios", 1 << 18))
    with pytest.raises(SessionError) as raised:
        images_in(tmp_path).create(huge)
    assert raised.value.reason is Reason.RAM_NO_SPACE
    assert "2 RAMBlocks total 1125899907104768 bytes (1048576.0 GiB)" in str(raised.value)
    assert "every page could have data" in str(raised.value)
    assert listing(tmp_path / "ram") == []
    # Unless asked not to check: the files are sparse, nothing is written yet.
    images = images_in(tmp_path, check_space=False)
    images.create((RamBlock("pc.ram", 1 << 40),))
    images.discard()
    assert listing(tmp_path / "ram") == []


def test_bad_names_create_nothing(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError):
        images_in(tmp_path).create((RamBlock("pc.ram", PAGE), RamBlock("..", PAGE)))
    assert not (tmp_path / "ram").exists()


def test_a_link_at_a_final_name_is_refused_not_followed(tmp_path: Path, victim: Path) -> None:
    directory = tmp_path / "ram"
    directory.mkdir(mode=0o700)
    (directory / "pc.ram").symlink_to(victim)
    with pytest.raises(DeviceIOError) as raised:
        images_in(tmp_path).create(BLOCKS)
    assert "a symbolic link (to" in str(raised.value)
    assert raised.value.device == "RAMBlock pc.ram"
    assert listing(directory) == ["pc.ram"]  # the link, and no .part left behind


def test_a_directory_others_may_write_in_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ram"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(UsageError) as raised:
        images_in(tmp_path).create(BLOCKS)
    assert "may be written by other users (mode 0777)" in str(raised.value)
    assert listing(directory) == []


def test_commit_replaces_old_images_and_keeps_their_mode(tmp_path: Path) -> None:
    directory = tmp_path / "ram"
    directory.mkdir(mode=0o700)
    (directory / "pc.ram").write_bytes(b"old")
    (directory / "pc.ram").chmod(0o640)
    images = images_in(tmp_path)
    images.create(BLOCKS[:1])
    assert (directory / "pc.ram").read_bytes() == b"old"  # untouched until the commit
    images.finish()
    images.commit()
    assert (directory / "pc.ram").stat().st_size == 256 * PAGE
    assert stat.S_IMODE((directory / "pc.ram").stat().st_mode) == 0o640
    assert listing(directory) == ["pc.ram"]


def test_a_commit_that_fails_leaves_every_final_path_as_it_was(tmp_path: Path) -> None:
    directory = tmp_path / "ram"
    directory.mkdir(mode=0o700)
    (directory / "pc.ram").write_bytes(b"old")
    images = images_in(tmp_path)
    images.create(BLOCKS[:2])
    images.finish()
    (directory / "%2From@etc%2Facpi%2Ftables").mkdir()  # a directory in the way
    with pytest.raises(DeviceIOError) as raised:
        images.commit()
    assert "a directory is in the way" in str(raised.value)
    assert (directory / "pc.ram").read_bytes() == b"old"
    images.discard()
    assert listing(directory) == ["%2From@etc%2Facpi%2Ftables", "pc.ram"]


def test_creating_twice_is_a_bug(tmp_path: Path) -> None:
    images = images_in(tmp_path)
    images.create(BLOCKS[:1])
    with pytest.raises(RuntimeError, match="exist already"):
        images.create(BLOCKS[:1])
    images.discard()
