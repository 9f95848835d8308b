"""The examples as a user runs them: ``make demo``'s script, the commands of README.md
and of the pages under docs/, and the links between them."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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


DOCS = ROOT / "docs"
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def sh_commands(page: Path) -> str:
    """Every ``sh`` block of a page in order, as one script (``make`` lines left out:
    the virtualenv the tests run in is what ``make install`` made)."""
    blocks = re.findall(r"^```sh\n(.*?)^```", page.read_text(), re.S | re.M)
    return "".join(
        line + "\n"
        for block in blocks
        for line in block.splitlines()
        if not line.startswith("make ")
    )


def readme_commands() -> str:
    return sh_commands(ROOT / "README.md")


def run_commands(script: str, short_dir: Path) -> subprocess.CompletedProcess[str]:
    """``script`` under ``bash -e`` at the repository root, with the command on PATH (as
    the README's quick start sets it), the pages' port 4444 replaced by a free one, and
    whatever it left in the background killed when it ends."""
    with socket.socket() as probe:  # port 4444 may be taken here
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = script.replace("tcp:127.0.0.1:4444", f"tcp:127.0.0.1:{port}")
    cleanup = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
    return subprocess.run(
        ["bash", "-e", "-c", cleanup + script],
        cwd=ROOT,
        env={
            **os.environ,
            "TMPDIR": str(short_dir),  # mktemp -d makes $work there
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        },
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_the_readme_commands_run_as_written(short_dir: Path) -> None:
    """They used /var/lib/mig/... and source=nic0.bin, which do not exist on a fresh machine."""
    script = readme_commands()
    assert "source .venv/bin/activate" in script and "mktemp -d" in script
    assert script.count("tcp:127.0.0.1:4444") == 2
    result = run_commands(script, short_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith("vfio-multifd ") and "(Python " in out[0]
    assert any(line.startswith("status: setup   ") for line in out), result.stdout
    assert "daemon exit 0: outputs in place" in out
    listing = ["nic0.bin", "nic0.bin.config", "nic0.state", "nic1.bin", "nic1.cfg"]
    at = out.index(listing[0])
    assert out[at:] == listing


def check_sending(script: str, out: list[str]) -> None:
    """``--ram``: both ends count the same pages, pc.ram is kept. A fault injected: the
    daemon fails naming channel, device and idx, and writes no file."""
    assert script.count("tcp:127.0.0.1:4444") == 2 and "--inject duplicate" in script
    assert out[:4] == [
        "daemon exit 0",
        "ram: pc.ram 8388608 bytes in 3 rounds: 866 pages, 1390 zero pages, 4 sync points; "
        "main stream 513 bytes",
        "ram: 866 pages (3547136 bytes), 1390 zero pages, 4 sync points; main stream 513 bytes",
        "pc.ram",
    ]
    assert out[4:] == [
        "send exit 1",
        "daemon exit 1",
        "vfio-multifd: error: channel 0: device 0000:00:02.0/vfio: state buffer 0 already filled",
        "daemon.log",
        "send.log",
    ]


def check_record_replay(script: str, out: list[str]) -> None:
    """The recording's files, then the replay's report, then byte-equal files."""
    assert "mktemp -d" in script and script.count("--record ") == 1
    assert out[:3] == ["channel-0.bin", "channel-1.bin", "manifest.json"]
    # By first byte received: the sender's two threads may start in either order.
    assert out[5] in ("connection order (recorded): channel ids 0, 1",
                      "connection order (recorded): channel ids 1, 0")  # fmt: skip
    assert out[-2].startswith("replayed 3") and out[-1] == "replayed: byte-equal"


#: Each page under docs/ whose ``sh`` blocks are run, and what its output must be.
PAGE_CHECKS = {"sending.md": check_sending, "record-replay.md": check_record_replay}


def test_every_docs_page_with_commands_is_run() -> None:
    pages = sorted(page.name for page in DOCS.glob("*.md") if sh_commands(page))
    assert pages == sorted(PAGE_CHECKS)


@pytest.mark.parametrize("name", sorted(PAGE_CHECKS))
def test_the_docs_commands_run_as_written(name: str, short_dir: Path) -> None:
    """Each page's blocks as one script of its own: each page makes its own $work."""
    script = sh_commands(DOCS / name)
    result = run_commands(script, short_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    PAGE_CHECKS[name](script, result.stdout.splitlines())
    # No sender started before its daemon listened: it would say it retries.
    logs = [result.stderr, *(p.read_text() for p in short_dir.glob("*/*.log"))]
    assert not [text for text in logs if "connect_retrying" in text]


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.*)$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        repeats = counts.get(slug, 0)
        counts[slug] = repeats + 1
        found.add(slug if repeats == 0 else f"{slug}-{repeats}")  # as GitHub numbers repeats
    return found


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_readme_is_short_and_links_every_docs_page() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) < 300
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(readme)}
    unlinked = sorted(p.name for p in DOCS.glob("*.md") if p.resolve() not in linked)
    assert not unlinked, unlinked


@pytest.mark.parametrize(
    "page", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda page: page.name
)
def test_every_relative_link_resolves(page: Path) -> None:
    """To an existing file, and to one of its headings when it names one."""
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (
            anchor and linked.suffix == ".md" and anchor not in anchors(linked)
        ):
            broken.append(target)
    assert not broken, broken
