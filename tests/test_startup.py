"""The command line starts lean: structlog without rich (cli/lean_imports.py).

rich and pygments were a third of a daemon's start-up CPU, loaded by structlog
only to offer tracebacks the console renderer does not print.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import structlog

from vfio_multifd import logconfig

_CODE = """
import json, sys
import vfio_multifd.cli
before = {name: name in sys.modules for name in ("structlog", "rich", "pygments")}
from rich.progress import Progress  # send's progress display still has rich
print(json.dumps([before, "rich" in sys.modules]))
"""


def test_the_command_line_imports_structlog_but_not_rich() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=60, check=True
    )
    before, rich_after = json.loads(result.stdout)
    assert before == {"structlog": True, "rich": False, "pygments": False}
    assert rich_after


@pytest.mark.usefixtures("restore_logging")
def test_console_logs_print_a_plain_traceback() -> None:
    out = io.StringIO()
    assert logconfig.configure(log_format="console", stream=out) == "console"
    try:
        raise ValueError("the cause")
    except ValueError:
        structlog.get_logger("t").exception("it_failed")
    text = out.getvalue()
    assert "it_failed" in text
    assert "Traceback (most recent call last):" in text and "ValueError: the cause" in text
    assert "╭" not in text  # rich's boxed traceback
