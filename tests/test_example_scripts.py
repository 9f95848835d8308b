"""The examples in examples/ run as the README lists them: each checks its own result and exits 0.

Small sizes, so they take a second or two each (``make demo`` sends 2 x 192 MiB).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.slow


def run_example(*command: str) -> subprocess.CompletedProcess[str]:
    # The examples find the command next to this interpreter (the project's .venv).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL
    )


def test_demo_sends_and_compares_digests() -> None:
    result = run_example(sys.executable, str(EXAMPLES / "demo.py"), "--size", "3M")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().splitlines()[-1].startswith("demo: digests match")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_loopback_script_over_a_unix_socket() -> None:
    result = run_example("bash", str(EXAMPLES / "loopback.sh"), "2M")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status: " in result.stdout, "vfio-multifd status answered while it ran"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_record_replay_script_replays_a_migration_and_a_failure() -> None:
    result = run_example("bash", str(EXAMPLES / "record-replay.sh"), "3M")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.splitlines()
    assert "record-replay: the replayed daemon's files are byte-equal to the original's" in out
    assert out[-1] == "record-replay: the replay failed with the same error"
    assert any(
        line.startswith("replay:   exit 1, vfio-multifd: error: channel 0: device ")
        and line.endswith("already filled")
        for line in out
    ), result.stdout


def test_library_example() -> None:
    result = run_example(sys.executable, str(EXAMPLES / "library.py"))
    assert result.returncode == 0, result.stdout + result.stderr
