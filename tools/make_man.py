"""``make man``: docs/vfio-multifd.1 from the command line's own parsers.

One page with every subcommand, made by argparse-manpage from
:func:`vfio_multifd.cli.build_parser`, so that it says what ``--help`` says;
tests/test_manpage.py checks that the committed page is what this writes now.
Usage: ``python tools/make_man.py [OUTPUT]`` (default docs/vfio-multifd.1).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# argparse wraps usage and help to the terminal's width: the page must not depend on it.
os.environ["COLUMNS"] = "80"

from argparse_manpage.manpage import Manpage

from vfio_multifd import __version__
from vfio_multifd.cli import build_parser

PAGE = Path(__file__).resolve().parent.parent / "docs" / "vfio-multifd.1"


def manual_page() -> str:
    page = Manpage(build_parser())
    page.description = "receive QEMU multifd device state (VFIO) into files, and send it"
    page.source = f"vfio-multifd {__version__}"
    page.manual = "vfio-multifd manual"
    # No date: the page changes only when the parsers (or the version) do, and a
    # date would make every regeneration a change.
    page.date = ""
    return str(page)


def main(argv: list[str]) -> int:
    output = Path(argv[0]) if argv else PAGE
    output.write_text(manual_page())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
