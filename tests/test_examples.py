"""The examples as a user runs them: ``make demo``'s script, and the README's commands."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_demo_says_in_its_first_line_that_the_outputs_are_deleted_unless_keep() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--size", "1M", "--channels", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    match = re.fullmatch(
        r"demo: 2 devices x 1M, 2 channels, random order, outputs in (\S+) "
        r"\(deleted at the end unless --keep\)",
        first,
    )
    assert match, first
    assert not Path(match.group(1)).exists()
    assert result.stdout.splitlines()[-1] == "demo: digests match (sender exit 0, daemon exit 0)"


def readme_commands() -> str:
    """Every ``sh`` block of README.md in order, as one script (``make`` lines left out:
    the virtualenv the tests run in is what ``make install`` made)."""
    blocks = re.findall(r"^```sh\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    return "".join(
        line + "\n"
        for block in blocks
        for line in block.splitlines()
        if not line.startswith("make ")
    )


def test_the_readme_commands_run_as_written(short_dir: Path) -> None:
    """They used /var/lib/mig/... and source=nic0.bin, which do not exist on a fresh machine."""
    script = readme_commands()
    assert "source .venv/bin/activate" in script and "mktemp -d" in script
    with socket.socket() as probe:  # the README's port 4444 may be taken here
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert script.count("tcp:127.0.0.1:4444") == 2
    script = script.replace("tcp:127.0.0.1:4444", f"tcp:127.0.0.1:{port}")
    result = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(short_dir)},  # mktemp -d makes $work there
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith("vfio-multifd ") and "(Python " in out[0]
    assert any(line.startswith("status: setup   ") for line in out), result.stdout
    assert "daemon exit 0: outputs in place" in out
    listing = ["nic0.bin", "nic0.bin.config", "nic0.state", "nic1.bin", "nic1.cfg"]
    at = out.index(listing[0])
    assert out[at : at + 5] == listing
    # Recording and replaying: the recording's files, then the replay's report.
    assert out[at + 5 : at + 8] == ["channel-0.bin", "channel-1.bin", "manifest.json"]
    assert out[at + 10] == "connection order (recorded): channel ids 0, 1"
    assert out[-2].startswith("replayed 3") and out[-1] == "replayed: byte-equal"
