"""The stores the contract suite runs against, each built on the test's FakeClock.

`store` is one replica's store; `replica()` makes another replica's store sharing its state
(the same object for MemoryStore; a second RedisStore on the same server and prefix for Redis).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from resilience import MemoryStore, Store
from resilience.testing import FakeClock

from ..helpers import unique_prefix


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the store implementation under test."""
    return str(request.param)


@pytest.fixture
async def replicas(
    backend: str, clock: FakeClock, request: pytest.FixtureRequest
) -> AsyncIterator[list[Store]]:
    """Every store made for this test (closed at the end)."""
    made: list[Store] = []
    yield made
    for s in made:
        await s.aclose()


@pytest.fixture
def replica(
    backend: str, clock: FakeClock, replicas: list[Store], request: pytest.FixtureRequest
) -> Callable[[], Store]:
    """Make the store of one more replica sharing state with the others."""
    if backend == "memory":
        shared = MemoryStore(clock=clock)

        def make() -> Store:
            replicas.append(shared)
            return shared

        return make
    from resilience.store.redis import RedisStore

    url = request.getfixturevalue("redis_url")
    prefix = unique_prefix("contract")

    def make_redis() -> Store:
        s = RedisStore.from_url(url, prefix=prefix, clock=clock, timeout=2.0)
        replicas.append(s)
        return s

    return make_redis


@pytest.fixture
def store(replica: Callable[[], Store]) -> Store:
    """The first replica's store."""
    return replica()


@pytest.fixture
def settle(replicas: list[Store]) -> Callable[[], object]:
    """Let every replica push its outcomes and pull the fleet's state (twice, for verdicts)."""

    async def run() -> None:
        for _ in range(2):
            for s in dict.fromkeys(replicas):
                await s.sync()

    return run
