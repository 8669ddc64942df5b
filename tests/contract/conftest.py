"""The stores the contract suite runs against; each is built on the test's FakeClock."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from resilience import MemoryStore, Store
from resilience.testing import FakeClock


@pytest.fixture(params=["memory"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Store]:
    """Every Store implementation, built on the fake clock."""
    if request.param == "memory":
        s: Store = MemoryStore(clock=clock)
    else:  # pragma: no cover - more stores join here
        raise AssertionError(request.param)
    try:
        yield s
    finally:
        await s.aclose()
