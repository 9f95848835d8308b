"""Every file the daemon creates by name, where another local user may have put
something first (issue 20, items 6 and 7).

The daemon often runs as root; so do these tests. Another user is played by
``os.chown`` to an unused uid, and an attacker's move by a link planted while
the daemon runs. Each test failed on the code before its fix, except those
marked as guards: those paths were already safe, and the test keeps them so.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qemu_source as qs
from cli_helpers import Daemon, one_device_daemon, receive_usage_error, send_to
from helpers import IDSTR, assert_outputs, connect, random_bytes, settings, start, until

from vfio_multifd import DeviceIOError, DeviceKey, UsageError
from vfio_multifd.config import RecordSettings
from vfio_multifd.daemon import output as output_module
from vfio_multifd.daemon.output import Output
from vfio_multifd.daemon.spill import Spiller
from vfio_multifd.ops.recorder import Recorder

A = DeviceKey(IDSTR, 0)
STRANGER = (12345, 23456)  # uid, gid of nobody on this machine
DATA = random_bytes(6 * 4096 + 5, 20)
CONFIG = b"config of A"
STREAMS = qs.build_streams([(IDSTR, 0, DATA, CONFIG)], channels=2, chunk_size=4096)
VICTIM = b"a file the daemon must never write\n"

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="playing another user needs root")


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    """A file outside every directory the daemon writes in; it must stay as it is."""
    path = tmp_path / "victim"
    path.write_bytes(VICTIM)
    yield path
    assert path.read_bytes() == VICTIM, "the daemon wrote through a planted link"


# -- item 6: --record DIR ----------------------------------------------------------------


async def test_links_planted_in_the_recording_directory_are_never_written_through(
    tmp_path: Path, victim: Path
) -> None:
    """The manifest was written through ``DIR/.manifest.json.tmp`` (O_CREAT|O_TRUNC);
    a channel file is created only where nothing is (this part was already so)."""
    record = tmp_path / "rec"
    (tmp_path / "out").mkdir()
    config = settings(tmp_path / "out", A, record=RecordSettings(record))
    running = await start(config)
    (record / ".manifest.json.tmp").symlink_to(victim)
    (record / "channel-0.bin").symlink_to(victim)
    await asyncio.to_thread(qs.send_streams, running.address, STREAMS)
    await running.result(timeout=10)
    assert_outputs(config, [(DATA, qs.config_blob(CONFIG))])
    assert stat.S_ISREG(os.lstat(record / "manifest.json").st_mode)
    manifest = json.loads((record / "manifest.json").read_text())
    assert manifest["outcome"] == "completed" and manifest["complete"] is False
    assert manifest["stopped"].startswith("cannot create channel-0.bin: File exists")
    assert os.readlink(record / "channel-0.bin") == str(victim)
    assert sorted(os.listdir(record)) == ["channel-0.bin", "channel-1.bin", "manifest.json"]


@as_root
@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("owner", f"belongs to another user (uid {STRANGER[0]}, not 0)"),
        ("group-writable", "may be written by other users (mode 0770)"),
        ("other-writable", "may be written by other users (mode 1777)"),
    ],
)
def test_a_record_directory_others_may_write_in_is_refused(
    tmp_path: Path, change: str, why: str
) -> None:
    record = tmp_path / "rec"
    record.mkdir(mode=0o700)
    if change == "owner":
        os.chown(record, *STRANGER)
    else:
        os.chmod(record, 0o770 if change == "group-writable" else 0o1777)
    line = receive_usage_error(tmp_path, "--record", str(record))
    assert line == f"vfio-multifd: error: --record {record} {why}: " + (
        "give a directory of the daemon's own user"
        if change == "owner"
        else "give a directory only its owner may write in"
    )
    assert os.listdir(record) == []


@as_root
def test_a_record_directory_another_user_made_after_the_check_is_refused(
    tmp_path: Path,
) -> None:
    """The directory was checked, then made with makedirs(exist_ok=True): one made by
    someone else in between was taken."""
    record = tmp_path / "rec"
    recorder = Recorder(settings(tmp_path, A, record=RecordSettings(record)))
    record.mkdir(mode=0o700)
    os.chown(record, *STRANGER)
    with pytest.raises(UsageError) as refused:
        recorder.start()
    assert "belongs to another user" in str(refused.value)
    assert os.listdir(record) == []


# -- item 7: outputs keep their mode and owner; .part files are private ----------------------


@as_root
async def test_an_existing_file_keeps_its_mode_and_owner_when_replaced(tmp_path: Path) -> None:
    config = settings(tmp_path, A)
    spec = config.devices[0]
    for path, mode in ((spec.data_path, 0o600), (spec.config_path, 0o640)):
        path.write_bytes(b"the old state")
        os.chown(path, *STRANGER)
        os.chmod(path, mode)
    running = await start(config)
    await asyncio.to_thread(qs.send_streams, running.address, STREAMS)
    await running.result(timeout=10)
    assert_outputs(config, [(DATA, qs.config_blob(CONFIG))])
    for path, mode in ((spec.data_path, 0o600), (spec.config_path, 0o640)):
        info = os.stat(path)
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (mode, *STRANGER), path


def _new_file_mode() -> int:
    return 0o666 & ~output_module._UMASK


@pytest.mark.parametrize("existing", [None, 0o644, 0o640, 0o400])
async def test_part_files_are_never_more_open_than_the_final_file(
    tmp_path: Path, existing: int | None
) -> None:
    """They were 0644 (0666 less the umask) while device state streamed in,
    whatever the file they were to replace allowed."""
    config = settings(tmp_path, A, channels=1)
    spec = config.devices[0]
    final = _new_file_mode() if existing is None else existing
    if existing is not None:
        spec.data_path.write_bytes(b"the old state")
        os.chmod(spec.data_path, existing)
    [stream] = qs.build_streams([(IDSTR, 0, DATA, CONFIG)], channels=1, chunk_size=4096)
    running = await start(config)
    device = running.session.core.reassembly.devices[A]
    with connect(running.address) as sock:
        sock.sendall(stream[: len(stream) // 2])
        await until(lambda: device.bytes_written, "a chunk written")
        parts = [name for name in os.listdir(tmp_path) if name.endswith(".part")]
        assert len(parts) == 2, parts  # the data file's and the config file's
        for name in parts:
            is_config = name.startswith(f".{spec.config_path.name}.")
            mode_then = _new_file_mode() if is_config else final
            mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
            assert mode == mode_then & 0o600, f"{name}: {mode:04o} while streaming ({mode_then:04o} then)"
        sock.sendall(stream[len(stream) // 2 :])
        await running.result(timeout=10)
    assert stat.S_IMODE(os.stat(spec.data_path).st_mode) == final
    assert stat.S_IMODE(os.stat(spec.config_path).st_mode) == _new_file_mode()
    assert_outputs(config, [(DATA, qs.config_blob(CONFIG))])


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_a_new_file_gets_the_mode_open_would_give_it(
    tmp_path: Path, one_loop_daemons: list[Daemon], umask: int
) -> None:
    """A guard: new files follow the daemon's umask, as open() would make them."""
    daemon, data_path = one_device_daemon(tmp_path, one_loop_daemons, 1, preexec_fn=lambda: os.umask(umask))
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)
    sent = send_to(daemon.address, 1, f"idstr={IDSTR},source={source}")
    assert sent.returncode == 0, sent.stderr
    code, _, err = daemon.finish()
    assert code == 0, err
    assert data_path.read_bytes() == DATA
    for path in (data_path, Path(f"{data_path}.config")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path


# -- the audit: FIFOs and character devices, the spill file, unix sockets ----------------------


def test_a_fifo_replaced_by_a_link_while_waiting_for_its_reader_is_not_opened(
    tmp_path: Path, victim: Path
) -> None:
    """The daemon opens a FIFO output again and again until a reader comes: another
    user who could replace it had all that time to put a link to any file there."""
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    output = Output(fifo, device=str(A), what="data file")
    failed: list[BaseException] = []

    def opening() -> None:
        try:
            output.open()
        except BaseException as error:  # reported below
            failed.append(error)

    thread = threading.Thread(target=opening)
    thread.start()
    try:
        deadline = 50
        while not output.waiting_for_reader and deadline:
            threading.Event().wait(0.02)
            deadline -= 1
        assert output.waiting_for_reader, "the output never waited for the FIFO's reader"
        fifo.unlink()
        fifo.symlink_to(victim)
        thread.join(5)
    finally:
        output.stop.set()
        thread.join(5)
    assert not thread.is_alive()
    [error] = failed
    assert isinstance(error, DeviceIOError)
    assert str(error).endswith(
        f"cannot open data file {fifo}: no longer a FIFO: something replaced it since it was "
        "looked at"
    )
    assert output.fd is None


def test_a_character_device_replaced_by_a_link_as_it_is_opened_is_not_written(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the look at the path (a character device) and the open, a link to a
    regular file is put there: the descriptor is checked, not the name."""
    path = tmp_path / "out.dev"
    path.symlink_to("/dev/null")  # a link to a device is allowed (/dev/stdout is one)
    real_open = os.open

    def swapped_open(name: Any, *args: Any, **kwargs: Any) -> int:
        if Path(name) == path:
            path.unlink()
            path.symlink_to(victim)
        return real_open(name, *args, **kwargs)

    output = Output(path, device=str(A), what="data file")
    monkeypatch.setattr(os, "open", swapped_open)
    with pytest.raises(DeviceIOError) as refused:
        output.open()
    monkeypatch.undo()
    assert "no longer a character device" in str(refused.value)
    assert output.fd is None


async def test_the_spill_file_has_no_name_and_only_its_owner_may_read_it(tmp_path: Path) -> None:
    """A guard: made by mkstemp (a new random name, O_EXCL, never through a link),
    mode 0600, and unlinked at once."""
    spiller = Spiller(tmp_path)
    try:
        await spiller.write(memoryview(DATA), A, 3, 0)
        assert spiller.store is not None and spiller.store.fd is not None
        info = os.fstat(spiller.store.fd)
        assert (info.st_nlink, stat.S_IMODE(info.st_mode)) == (0, 0o600)
        assert os.listdir(tmp_path) == []
    finally:
        spiller.close()


@pytest.mark.parametrize("option", ["--listen", "--status-socket"])
def test_a_link_at_a_unix_socket_path_is_refused_and_not_followed(
    tmp_path: Path, short_dir: Path, option: str
) -> None:
    """A guard: bind() and link() create the path itself and fail where anything is,
    a dangling link included; nothing is made at the link's target."""
    path = short_dir / "sock"
    target = short_dir / "target"
    path.symlink_to(target)
    value = f"unix:{path}" if option == "--listen" else str(path)
    line = receive_usage_error(tmp_path, option, value)
    what = f"unix:{path}" if option == "--listen" else f"--status-socket {path}"
    assert line.startswith(f"vfio-multifd: error: cannot listen on {what}: "), line
    assert not os.path.lexists(target)
    assert os.readlink(path) == str(target)
