"""What a new user meets before the first migration: installing, and the version."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import tomllib
from pathlib import Path

from cli_helpers import run

ROOT = Path(__file__).parent.parent


def test_version_names_the_package_python_uvloop_and_structlog() -> None:
    result = run(["--version"], timeout=20)
    assert result.returncode == 0, result.stderr
    versions = {name: importlib.metadata.version(name) for name in ("uvloop", "structlog")}
    assert result.stdout == (
        f"vfio-multifd {importlib.metadata.version('vfio-multifd')} "
        f"(Python {platform.python_version()}, uvloop {versions['uvloop']}, "
        f"structlog {versions['structlog']})\n"
    )
    assert result.stderr == ""


def test_the_version_is_written_once() -> None:
    import vfio_multifd

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "vfio_multifd.__version__"
    }
    assert importlib.metadata.version("vfio-multifd") == vfio_multifd.__version__


def test_license_is_an_spdx_string_so_setuptools_prints_no_deprecation_banner() -> None:
    """setuptools >= 77 deprecates the ``{ text = ... }`` table (a banner on every install)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert project["build-system"]["requires"] == ["setuptools>=77"]


def test_make_install_says_how_to_put_the_command_on_path() -> None:
    # -o: take the virtualenv as up to date, so only the target's own message runs.
    result = subprocess.run(
        ["make", "--no-print-directory", "-s", "-o", ".venv/.installed", "install"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "source .venv/bin/activate" in result.stdout
    assert f'export PATH="{ROOT}/.venv/bin:$PATH"' in result.stdout
    assert ".venv/bin/vfio-multifd" in result.stdout
    assert "pipx install ." in result.stdout
