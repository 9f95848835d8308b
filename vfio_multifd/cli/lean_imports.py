"""Imported first by the command line: structlog, without rich.

``import structlog`` always loads ``structlog.dev``, which imports rich (and
through it pygments) when it is installed, only to offer rich tracebacks. The
command line's console renderer prints plain tracebacks (logconfig.py), so a
daemon or a sender has no use for them, and they were a third of its start-up
CPU. rich stays importable afterwards: send's progress display imports it when
it draws.
"""

from __future__ import annotations

import sys

if "structlog" not in sys.modules and "rich" not in sys.modules:
    sys.modules["rich"] = None  # type: ignore[assignment]  # makes `import rich` fail
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]
