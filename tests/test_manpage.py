"""The manual page and ``--help``: every option of every subcommand in
docs/vfio-multifd.1, the committed page what ``make man`` writes now, and each
``--help`` saying what the command is for and how it exits."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vfio_multifd.cli import build_parser, main

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "docs" / "vfio-multifd.1"


def subparsers() -> dict[str, argparse.ArgumentParser]:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def page_sections() -> dict[str, str]:
    """The page's text (roff's ``\\-`` as ``-``) by subcommand: from its COMMAND heading
    to the next one."""
    text = PAGE.read_text().replace("\\-", "-")
    parts = re.split(r"^\.SH COMMAND \\fI\\,'vfio-multifd (\w+)'\\/\\fR$", text, flags=re.M)
    assert len(parts) == 1 + 2 * len(subparsers()), "one COMMAND section per subcommand"
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_option_of_every_subcommand_is_in_its_section_of_the_page() -> None:
    sections = page_sections()
    assert sorted(sections) == sorted(subparsers())
    for name, parser in subparsers().items():
        for action in parser._actions:
            for option in action.option_strings:
                if option in ("-h", "--help"):
                    continue
                assert re.search(rf"\\fB{re.escape(option)}\\fR", sections[name]), (name, option)
            if not action.option_strings:  # a positional: replay's DIR
                assert action.metavar and str(action.metavar) in sections[name], (name, action)


def test_the_committed_page_is_what_make_man_writes_now(tmp_path: Path) -> None:
    """A changed option without `make man` fails here, so the page cannot drift."""
    written = tmp_path / "vfio-multifd.1"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_man.py"), str(written)],
        check=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},  # the terminal's width must not matter
    )
    assert written.read_text() == PAGE.read_text(), "run make man and commit docs/vfio-multifd.1"


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_man_shows_the_page_from_the_source_tree() -> None:
    shown = subprocess.run(
        ["man", "-l", "-P", "cat", str(PAGE)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80", "LANG": "C.UTF-8"},
    )
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    for heading in ("COMMAND 'vfio-multifd receive'", "OPTIONS 'vfio-multifd send'"):
        assert heading in text
    assert "--max-queued-bytes SIZE" in text


def help_text(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # help wraps lines


@pytest.mark.parametrize("command", sorted(subparsers()))
def test_every_subcommand_help_says_what_it_does_and_its_exit_codes(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert subparsers()[command].description
    text = help_text(capsys, [command])
    assert re.search(r"Exit 0: .*; 1: .*; 2: usage error", text), text


def test_the_top_level_help_names_the_qemu_and_where_the_docs_are(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = help_text(capsys, [])
    assert "QEMU 10.x's VFIO multifd device-state packets" in text
    assert "README.md and docs/" in text and "man ./docs/vfio-multifd.1" in text
