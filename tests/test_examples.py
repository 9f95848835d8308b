"""The examples as a user runs them: ``make demo``'s script, and the README's commands."""

from __future__ import annotations

import re
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
