"""What the benchmark reports share: progress lines, a median with its range, tables."""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence


def quiet_sender() -> None:
    """The replay sender's own log lines (the sender's ``waiting_for_daemon``) only at
    warning and above, on stderr: stdout is the report's. For a script's ``__main__``:
    it sets the process's logging."""
    from vfio_multifd import logconfig

    logconfig.configure(log_format="console", level="warning", stream=sys.stderr)


def run_status(ok: bool, figures: str, error: str) -> str:
    """A progress line's outcome: the run's figures, or why it failed."""
    return figures if ok else f"FAILED ({error})"


def progress(message: str) -> None:
    """One line per run on stderr, as it happens (the report itself goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def median_range(values: list[float], spec: str, scale: float = 1.0) -> str:
    """``median [min..max]`` of ``values`` times ``scale``; the median alone for one value,
    ``-`` for none (every run failed)."""
    if not values:
        return "-"
    median = format(statistics.median(values) * scale, spec)
    if len(values) == 1:
        return median
    return f"{median} [{min(values) * scale:{spec}}..{max(values) * scale:{spec}}]"


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1
) -> list[str]:
    """Columns as wide as their widest cell, the first ``left`` aligned left and the
    others right, a rule under the header."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def comma_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An option's type: a comma-separated list of ``choices`` (an unknown one is refused)."""

    def parse(text: str) -> list[str]:
        items = [part.strip() for part in text.split(",") if part.strip()]
        for item in items:
            if item not in choices:
                raise argparse.ArgumentTypeError(f"unknown {item!r} ({', '.join(choices)})")
        return items

    return parse
