"""Shared fixtures: a fake clock, and a real redis-server started on a free loopback port."""

from __future__ import annotations

import pytest

from resilience.testing import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    """A clock that moves only when the test advances it."""
    return FakeClock()
