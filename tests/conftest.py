"""Shared fixtures: every async test runs under asyncio, uvloop and trio."""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness import FdLeakCheck

pytest_plugins = ["tests.s3_server"]  # the session's SeaweedFS (s3_server fixture)


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def fd_leaks() -> FdLeakCheck:
    """``before = fd_leaks.snapshot()`` ... ``fd_leaks.assert_same(before)``."""
    return FdLeakCheck()
