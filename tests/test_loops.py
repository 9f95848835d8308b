"""Every async test runs under the stdlib loop and uvloop (conftest.py's
``pytest_asyncio_loop_factories``, a hook of pytest-asyncio >= 1.4): an older
pytest-asyncio would ignore the hook and run each test once, silently."""

from __future__ import annotations

import asyncio

import pytest
import uvloop


async def test_this_test_runs_once_under_each_loop(request: pytest.FixtureRequest) -> None:
    name = request.node.name
    assert name.endswith(("[asyncio]", "[uvloop]")), name
    is_uvloop = isinstance(asyncio.get_running_loop(), uvloop.Loop)
    assert is_uvloop == name.endswith("[uvloop]")
